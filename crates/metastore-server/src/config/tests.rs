use super::*;

#[test]
fn defaults_match_etcd() {
    let cfg = Config::load(Flags::default()).expect("load");
    assert_eq!(cfg.data_dir, "default.etcd");
    assert_eq!(
        cfg.client_addrs().expect("addrs"),
        vec!["127.0.0.1:2379".parse().expect("addr")]
    );
    assert_eq!(
        cfg.initial_members().expect("members"),
        vec![("default".into(), vec!["http://127.0.0.1:2380".into()])]
    );
    assert_eq!(cfg.limits.max_request_bytes, 1_572_864);
    assert_eq!(cfg.limits.max_txn_ops, 128);
    assert_eq!(cfg.lease.min_ttl, 2, "etcd's default minimum lease TTL");
}

#[test]
fn shipped_config_file_parses_and_flags_override() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/config.yaml");
    let flags = Flags {
        config_file: Some(path),
        name: Some("n1".into()),
        max_txn_ops: Some(4),
        ..Default::default()
    };
    let cfg = Config::load(flags).expect("load");
    assert_eq!(cfg.name, "n1");
    assert_eq!(cfg.limits.max_txn_ops, 4);
    assert_eq!(cfg.raft.election_tick, 10);
    assert_eq!(cfg.grpc.max_concurrent_streams, 2048);
}

#[test]
fn the_example_cluster_config_parses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/example.yaml");
    let cfg = Config::load(Flags {
        config_file: Some(path),
        ..Default::default()
    })
    .expect("load");
    assert_eq!(cfg.initial_members().expect("members").len(), 3);
    assert_eq!(cfg.storage, StorageKind::Rocksdb);
}

#[test]
fn version_is_a_flag_and_a_subcommand() {
    let cli = Cli::try_parse_from(["metastore", "--version"]).expect("parse");
    assert!(cli.version && cli.command.is_none());
    let cli = Cli::try_parse_from(["metastore", "version"]).expect("parse");
    assert!(matches!(cli.command, Some(Subcommand::Version)));
    let cli = Cli::try_parse_from([
        "metastore",
        "--log-format",
        "json",
        "--log-outputs",
        "stdout,/tmp/ms.log",
    ])
    .expect("parse");
    let cfg = Config::load(cli.flags).expect("load");
    assert_eq!(cfg.log_format, LogFormat::Json);
    assert_eq!(cfg.log_outputs, "stdout,/tmp/ms.log");
    assert!(Cli::try_parse_from(["metastore", "--log-format", "xml"]).is_err());
}

#[test]
fn bad_urls_are_explained() {
    assert!(parse_url("https://127.0.0.1:1").is_err());
    assert!(parse_url("http://nonsense").is_err());
}
