use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A fresh machine has no protoc: use the vendored one unless the user chose one.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let etcd = root.join("etcd");
    let ours = root.join("metastore");
    let files = [
        etcd.join("etcdserverpb/rpc.proto"),
        etcd.join("mvccpb/kv.proto"),
        etcd.join("authpb/auth.proto"),
        etcd.join("v3electionpb/v3election.proto"),
        etcd.join("v3lockpb/v3lock.proto"),
        ours.join("internal.proto"),
        ours.join("batch.proto"),
        ours.join("peer.proto"),
    ];
    println!("cargo:rerun-if-changed={}", root.display());
    tonic_prost_build::configure()
        // Keys and values are shared, not copied, from the wire to the engine.
        .bytes(".")
        .compile_protos(&files, &[etcd, ours])?;
    Ok(())
}
