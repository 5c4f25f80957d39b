//! The framing guard in front of a real hyper HTTP/1 server.
