//! Build steps that run before the crate compiles. Each step is one function called from `main`.

fn main() {
    if let Err(error) = compile_etcd_proto() {
        // A build script reports failure by panicking; the message is what cargo prints.
        panic!("cannot compile proto/etcd: {error}");
    }
}

/// Compiles the vendored etcd v3 API (`proto/etcd/`) into gRPC client code in `OUT_DIR`, with
/// the pure-Rust `protox` compiler: no `protoc` and no system protobuf includes needed.
/// `src/catalog/etcd/client.rs` includes the generated `etcdserverpb.rs` and `mvccpb.rs`.
fn compile_etcd_proto() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd");
    let files = protox::compile(["etcd/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(files)?;
    Ok(())
}
