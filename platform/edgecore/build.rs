//! Compiles Kubernetes' CRI v1 proto (`proto/cri/api.proto`, vendored from k8s.io/cri-api) with
//! protox (pure Rust: no `protoc` needed). Only the client side is generated.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto/cri"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
