mod consul_backend;
mod registry;
