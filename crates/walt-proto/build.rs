//! Compiles `proto/walt/v1/*.proto` with protox (pure Rust): no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("walt/v1/images.proto"),
        root.join("walt/v1/admin.proto"),
        root.join("walt/v1/nodes.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    // `Credentials` gets a hand-written `Debug` that hides the password.
    tonic_prost_build::configure()
        .skip_debug([".walt.v1.Credentials"])
        // The archives of `walt image cp` as `Bytes`: decoded as slices of
        // the received buffer, not copied once more.
        .bytes(".walt.v1.CopyInRequest.tar")
        .bytes(".walt.v1.CopyOutChunk.tar")
        .compile_fds(fds)?;
    Ok(())
}
