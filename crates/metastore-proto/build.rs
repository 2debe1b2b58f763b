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
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure()
        // Keys and values are shared, not copied, from the wire to the engine.
        .bytes(".")
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&files, &[etcd, ours])?;
    // JSON for the gateway, as grpc-gateway's JSONPb{OrigName: true} writes it: proto field
    // names as declared, 64-bit integers as strings, bytes as base64, enum names, zero values
    // left out. Only the public API (the JSON gateway's messages, and ours).
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3electionpb",
            ".v3lockpb",
            ".metastore.v1",
        ])?;
    Ok(())
}
