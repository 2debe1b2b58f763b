//! Configuration: `configs/config.yaml`-style file, overridden by etcd-style flags.

use crate::logging::LogFormat;
use clap::Parser;
use metastore_api::compactor::{parse_retention, CompactionMode, Retention};
use metastore_api::{LeaseConfig, Limits};
use metastore_batch::BatchConfig;
use metastore_raft::RaftConfig;
use metastore_rocksdb::RocksDbConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use urls::{parse_client_url, parse_url, split};

mod urls;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("invalid config file {0}: {1}")]
    Parse(PathBuf, serde_yaml::Error),
    #[error("invalid URL {0:?}: {1}")]
    Url(String, String),
    #[error("invalid --initial-cluster {0:?}: {1}")]
    InitialCluster(String, String),
    #[error("{0}")]
    Unsupported(String),
}

/// etcd's `--initial-cluster-state`: how a member with an empty data dir starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    /// Bootstrap a new cluster from `--initial-cluster`.
    #[default]
    New,
    /// Join a running cluster that this member was added to (`etcdctl member add`).
    Existing,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Memory,
    Rocksdb,
}

fn parse_mode(text: &str) -> Result<CompactionMode, String> {
    match text {
        "periodic" => Ok(CompactionMode::Periodic),
        "revision" => Ok(CompactionMode::Revision),
        other => Err(format!(
            "unknown auto-compaction mode {other:?} (periodic or revision)"
        )),
    }
}

/// etcd's `--metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsLevel {
    #[default]
    Basic,
    Extensive,
}

/// gRPC server tuning (layer 1 of the plans).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct GrpcConfig {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub tcp_nodelay: bool,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 2048,
            initial_stream_window_size: 8 * 1024 * 1024,
            initial_connection_window_size: 16 * 1024 * 1024,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 10_000,
            tcp_nodelay: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Config {
    pub name: String,
    /// Empty means `<name>.etcd`, as etcd does.
    pub data_dir: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub listen_peer_urls: String,
    pub initial_advertise_peer_urls: String,
    /// Extra listeners that serve only `/metrics` and the health endpoints (etcd's
    /// `--listen-metrics-urls`); empty: none.
    pub listen_metrics_urls: String,
    /// Origins allowed to call the HTTP endpoints from a browser (etcd's `--cors`; `*`: any).
    pub cors: String,
    /// etcd's `--metrics`: `basic`, or `extensive` to add per-method gRPC latency histograms.
    pub metrics: MetricsLevel,
    /// KV requests slower than this are logged, "apply request took too long" (a Go duration,
    /// etcd's `--experimental-warning-apply-duration`).
    pub warning_apply_duration: String,
    /// etcd's `--auth-token`: `simple` (the only kind served so far).
    pub auth_token: String,
    /// etcd's `--auth-token-ttl`: seconds an unused simple token lives.
    pub auth_token_ttl: u64,
    /// etcd's `--bcrypt-cost` for password hashes.
    pub bcrypt_cost: u32,
    /// TLS on `https://` client URLs (etcd's `--cert-file`, `--trusted-ca-file`, ...).
    #[serde(flatten)]
    pub tls: crate::tls::ClientTls,
    /// TLS on `https://` peer URLs (etcd's `--peer-cert-file`, ...).
    #[serde(flatten)]
    pub peer_tls: crate::tls::PeerTls,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_cluster_state: ClusterState,
    /// Refuse membership changes that could cost the quorum (etcd's default).
    pub strict_reconfig_check: bool,
    /// Most learners the cluster may have at once.
    pub max_learners: usize,
    /// Run as a witness: vote and keep the raft log, hold no data, serve no clients.
    pub witness: bool,
    pub storage: StorageKind,
    pub log_level: String,
    /// `text` (etcd's `console`) or `json`.
    pub log_format: LogFormat,
    /// Comma-separated: `default` (stderr), `stderr`, `stdout`, or file paths (appended to).
    pub log_outputs: String,
    #[serde(flatten)]
    pub limits: Limits,
    /// Applied entries between two state-machine snapshots (memory engine) or flushes
    /// (RocksDB); the WAL below is then purged.
    pub snapshot_count: u64,
    /// Snapshot files kept (memory engine).
    pub snapshot_retention: usize,
    /// Interval of watch progress notifications, ms (etcd: 10 min).
    pub watch_progress_notify_interval_ms: u64,
    /// etcd's `--auto-compaction-mode`: `periodic` or `revision`.
    pub auto_compaction_mode: CompactionMode,
    /// etcd's `--auto-compaction-retention`: hours or a duration (periodic), revisions
    /// (revision); `0` turns auto-compaction off.
    pub auto_compaction_retention: String,
    /// How often the revision mode checks, ms (etcd: 5 minutes; shorter only for tests).
    pub auto_compaction_revision_interval_ms: u64,
    pub rocksdb: RocksDbConfig,
    pub lease: LeaseConfig,
    pub grpc: GrpcConfig,
    pub raft: RaftConfig,
    pub batch: BatchConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "default".into(),
            data_dir: String::new(),
            listen_client_urls: "http://127.0.0.1:2379".into(),
            advertise_client_urls: "http://127.0.0.1:2379".into(),
            listen_peer_urls: "http://127.0.0.1:2380".into(),
            initial_advertise_peer_urls: "http://127.0.0.1:2380".into(),
            listen_metrics_urls: String::new(),
            cors: "*".into(),
            metrics: MetricsLevel::Basic,
            warning_apply_duration: "100ms".into(),
            auth_token: "simple".into(),
            auth_token_ttl: 300,
            bcrypt_cost: 10,
            tls: Default::default(),
            peer_tls: Default::default(),
            initial_cluster: String::new(),
            initial_cluster_token: "etcd-cluster".into(),
            initial_cluster_state: ClusterState::New,
            strict_reconfig_check: true,
            max_learners: 1,
            witness: false,
            storage: StorageKind::Memory,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            log_outputs: "default".into(),
            limits: Limits::default(),
            snapshot_count: 10_000,
            snapshot_retention: 3,
            watch_progress_notify_interval_ms: 600_000,
            auto_compaction_mode: CompactionMode::Periodic,
            auto_compaction_retention: "0".into(),
            auto_compaction_revision_interval_ms: 300_000,
            rocksdb: RocksDbConfig::default(),
            lease: LeaseConfig::default(),
            grpc: GrpcConfig::default(),
            raft: RaftConfig::default(),
            batch: BatchConfig::default(),
        }
    }
}

/// The `metastore` command line: the server's flags, or a tool subcommand.
#[derive(Parser, Debug)]
#[command(
    name = "metastore",
    about = "MetaStore: an etcd v3 compatible metadata store",
    // `--version` prints etcd's multi-line layout (crate::version), not clap's one line.
    disable_version_flag = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    #[command(flatten)]
    pub flags: Flags,
    #[command(subcommand)]
    pub command: Option<Subcommand>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Subcommand {
    /// Print the version and exit (the same as --version).
    Version,
    /// Backup files in etcd's format (as `etcdutl snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Hash, revision, keys and size of a snapshot file (from `etcdctl snapshot save`, against
    /// etcd or MetaStore), as `etcdctl snapshot status` prints them.
    Status {
        file: PathBuf,
        /// `simple` (default), `json` or `table`, as etcdctl's `--write-out`.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Creates a data dir from a snapshot file (from `etcdctl snapshot save`, against etcd or
    /// MetaStore) for a new cluster, as `etcdutl snapshot restore`: the same keys, revisions,
    /// leases and users; the members are the ones the flags name. Start each member with the
    /// same flags afterwards.
    Restore {
        file: PathBuf,
        /// Restore a file without the SHA-256 `snapshot save` appends (a backend file copied
        /// from a data dir), or whose hash does not match.
        #[arg(long)]
        skip_hash_check: bool,
        /// Add this to the latest revision (with --mark-compacted), so that a watcher that
        /// resumes from a revision it saw before the restore misses nothing.
        #[arg(long, default_value_t = 0)]
        bump_revision: u64,
        /// Mark the latest revision compacted (requires --bump-revision).
        #[arg(long)]
        mark_compacted: bool,
        /// The server's flags (--name, --data-dir, --initial-cluster, --initial-cluster-token,
        /// --initial-advertise-peer-urls, --storage, --config-file, ...).
        #[command(flatten)]
        flags: Box<Flags>,
    },
}

/// Server flags; names follow etcd's. Every flag overrides the config file.
#[derive(clap::Args, Debug, Default)]
pub struct Flags {
    /// YAML config file (see configs/config.yaml for every knob).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long)]
    pub name: Option<String>,
    /// Path to the data directory (default: <name>.etcd).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Comma-separated URLs to listen on for client traffic.
    #[arg(long)]
    pub listen_client_urls: Option<String>,
    /// Comma-separated client URLs advertised to the cluster.
    #[arg(long)]
    pub advertise_client_urls: Option<String>,
    /// Comma-separated URLs to listen on for peer traffic.
    #[arg(long)]
    pub listen_peer_urls: Option<String>,
    /// Comma-separated peer URLs advertised to the cluster.
    #[arg(long)]
    pub initial_advertise_peer_urls: Option<String>,
    /// Comma-separated URLs that serve `/metrics` and the health endpoints only.
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    /// Comma-separated origins allowed to call the HTTP endpoints and the JSON gateway from a
    /// browser (`*`: any, the default).
    #[arg(long)]
    pub cors: Option<String>,
    /// `basic`, or `extensive`: also per-method gRPC latency histograms
    /// (`grpc_server_handling_seconds`, which etcd-mixin's slow-request alert reads).
    #[arg(long, value_enum)]
    pub metrics: Option<MetricsLevel>,
    /// Log KV requests slower than this (a duration such as `100ms`, the default).
    #[arg(long, alias = "experimental-warning-apply-duration")]
    pub warning_apply_duration: Option<String>,
    /// Token kind: `simple` (the default; JWT is not served yet).
    #[arg(long)]
    pub auth_token: Option<String>,
    /// Seconds an unused simple token lives (default 300).
    #[arg(long)]
    pub auth_token_ttl: Option<u64>,
    /// bcrypt cost of password hashes, 4 to 31 (default 10).
    #[arg(long)]
    pub bcrypt_cost: Option<u32>,
    #[command(flatten)]
    pub tls: crate::tls::TlsFlags,
    #[command(flatten)]
    pub peer_tls: crate::tls::PeerTlsFlags,
    /// Auto-compaction: `periodic` (keep a span of time) or `revision` (keep a number of
    /// revisions).
    #[arg(long, value_parser = parse_mode)]
    pub auto_compaction_mode: Option<CompactionMode>,
    /// What auto-compaction keeps: hours or a duration such as `30m` (periodic), revisions
    /// (revision); `0` (the default) turns it off.
    #[arg(long)]
    pub auto_compaction_retention: Option<String>,
    /// Initial cluster configuration: name=peer-url,...
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Initial cluster token.
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    /// `new` bootstraps a cluster; `existing` joins one this member was added to.
    #[arg(long, value_enum)]
    pub initial_cluster_state: Option<ClusterState>,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long)]
    pub strict_reconfig_check: Option<bool>,
    /// Maximum number of learners in the cluster.
    #[arg(long)]
    pub max_learners: Option<usize>,
    /// Run as a witness: a voting member that keeps only the raft log (no data, no clients).
    #[arg(long)]
    pub witness: bool,
    /// Storage engine.
    #[arg(long, value_enum)]
    pub storage: Option<StorageKind>,
    /// Maximum client request size in bytes.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// Largest Range response in bytes (default 2 GiB, etcd's send limit); a larger one is
    /// refused as soon as it passes the limit, before it is all in memory.
    #[arg(long)]
    pub max_response_bytes: Option<usize>,
    /// Most bytes of write requests waiting to be proposed (each counted with 256 bytes of
    /// overhead); more are answered "etcdserver: too many requests" (batch.max-queued-bytes).
    #[arg(long)]
    pub max_queued_request_bytes: Option<usize>,
    /// Storage size that raises the NOSPACE alarm (0 = default 2 GiB).
    #[arg(long)]
    pub quota_backend_bytes: Option<u64>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Where logs go: comma-separated `default` (stderr), `stderr`, `stdout` or file paths.
    #[arg(long)]
    pub log_outputs: Option<String>,
    /// How often the leader checkpoints remaining lease TTLs through raft, ms.
    #[arg(long)]
    pub lease_checkpoint_interval_ms: Option<u64>,
    /// Interval of watch progress notifications, ms.
    #[arg(long)]
    pub watch_progress_notify_interval_ms: Option<u64>,
    /// Applied entries between state-machine snapshots / engine flushes.
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Entries the leader keeps for slow followers before it sends them a snapshot instead
    /// (etcd's flag of the same name).
    #[arg(long = "experimental-snapshot-catchup-entries")]
    pub snapshot_catchup_entries: Option<u64>,
}

impl Config {
    pub fn load(flags: Flags) -> Result<Config, ConfigError> {
        let mut cfg = match &flags.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse(path.clone(), e))?
            }
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = flags.$f { cfg.$f = v; })* };
        }
        set!(
            name,
            data_dir,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            initial_advertise_peer_urls,
            listen_metrics_urls,
            cors,
            metrics,
            warning_apply_duration,
            auth_token,
            auth_token_ttl,
            bcrypt_cost,
            initial_cluster,
            initial_cluster_token,
            initial_cluster_state,
            strict_reconfig_check,
            max_learners,
            storage,
            log_level,
            log_format,
            log_outputs,
            auto_compaction_mode,
            auto_compaction_retention
        );
        if flags.witness {
            cfg.witness = true;
        }
        cfg.tls.apply(flags.tls);
        cfg.peer_tls.apply(flags.peer_tls);
        if let Some(v) = flags.max_request_bytes {
            cfg.limits.max_request_bytes = v;
        }
        if let Some(v) = flags.max_response_bytes {
            cfg.limits.max_response_bytes = v;
        }
        if let Some(v) = flags.max_queued_request_bytes {
            cfg.batch.max_queued_bytes = v;
        }
        if let Some(v) = flags.max_txn_ops {
            cfg.limits.max_txn_ops = v;
        }
        if let Some(v) = flags.quota_backend_bytes {
            cfg.limits.quota_backend_bytes = v;
        }
        if let Some(v) = flags.lease_checkpoint_interval_ms {
            cfg.lease.checkpoint_interval_ms = v;
        }
        if let Some(v) = flags.watch_progress_notify_interval_ms {
            cfg.watch_progress_notify_interval_ms = v;
        }
        if let Some(v) = flags.snapshot_count {
            cfg.snapshot_count = v;
        }
        if let Some(v) = flags.snapshot_catchup_entries {
            cfg.raft.snapshot_catch_up_entries = v;
        }
        if cfg.lease.min_ttl == 0 {
            // etcd: 1.5 election timeouts, rounded up to whole seconds.
            let election_ms = cfg.raft.election_tick as u128 * cfg.raft.tick_interval.as_millis();
            cfg.lease.min_ttl = (election_ms * 3 / 2).div_ceil(1000) as i64;
        }
        if cfg.data_dir.is_empty() {
            cfg.data_dir = format!("{}.etcd", cfg.name);
        }
        if cfg.initial_cluster.is_empty() {
            cfg.initial_cluster = format!("{}={}", cfg.name, cfg.initial_advertise_peer_urls);
        }
        cfg.auto_compaction()?;
        cfg.warning_apply_duration()?;
        cfg.auth()?;
        let https = cfg.client_listeners()?.iter().any(|(_, tls)| *tls);
        cfg.tls
            .validate(https)
            .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        let peer_https = cfg.peer_listeners()?.iter().any(|(_, tls)| *tls);
        cfg.peer_tls
            .validate(peer_https)
            .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        Ok(cfg)
    }

    /// The auth settings, checked as etcd checks them.
    pub fn auth(&self) -> Result<metastore_api::AuthConfig, ConfigError> {
        let jwt = urls::auth_token(&self.auth_token).map_err(ConfigError::Unsupported)?;
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(ConfigError::Unsupported(format!(
                "--bcrypt-cost {}: must be between 4 and 31",
                self.bcrypt_cost
            )));
        }
        let auth = metastore_api::AuthConfig {
            bcrypt_cost: self.bcrypt_cost,
            token_ttl: std::time::Duration::from_secs(self.auth_token_ttl.max(1)),
            client_cert_auth: self.tls.client_cert_auth,
            jwt,
        };
        auth.validate().map_err(ConfigError::Unsupported)?;
        Ok(auth)
    }

    pub fn client_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        Ok(self
            .client_listeners()?
            .into_iter()
            .map(|(a, _)| a)
            .collect())
    }

    /// The client listeners: address, and whether it serves TLS (`https://`).
    pub fn client_listeners(&self) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
        split(&self.listen_client_urls)
            .map(parse_client_url)
            .collect()
    }

    /// The slow request threshold.
    pub fn warning_apply_duration(&self) -> Result<std::time::Duration, ConfigError> {
        metastore_api::compactor::parse_go_duration(&self.warning_apply_duration).ok_or_else(|| {
            ConfigError::Unsupported(format!(
                "invalid --warning-apply-duration {:?} (a duration such as 100ms)",
                self.warning_apply_duration
            ))
        })
    }

    /// The auto-compaction retention, checked against the mode.
    pub fn auto_compaction(&self) -> Result<Retention, ConfigError> {
        parse_retention(self.auto_compaction_mode, &self.auto_compaction_retention)
            .map_err(|e| ConfigError::Unsupported(e.to_string()))
    }

    pub fn metrics_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        split(&self.listen_metrics_urls).map(parse_url).collect()
    }

    /// The peer listeners: address, and whether it serves TLS (`https://`).
    pub fn peer_listeners(&self) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
        split(&self.listen_peer_urls)
            .map(parse_client_url)
            .collect()
    }

    /// How this member reaches its peers (TLS for `https://` peer URLs).
    pub fn peer_dialer(&self) -> metastore_transport::Dialer {
        metastore_transport::Dialer(std::sync::Arc::new(crate::tls::TlsDialer {
            settings: self.peer_tls.as_tls(),
        }))
    }

    pub fn advertise_client_urls(&self) -> Vec<String> {
        split(&self.advertise_client_urls)
            .map(str::to_string)
            .collect()
    }

    pub fn peer_urls(&self) -> Vec<String> {
        split(&self.initial_advertise_peer_urls)
            .map(str::to_string)
            .collect()
    }

    /// `name=url,name=url` as (name, urls) in the order given.
    pub fn initial_members(&self) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut members: Vec<(String, Vec<String>)> = Vec::new();
        for part in split(&self.initial_cluster) {
            let (name, url) = part.split_once('=').ok_or_else(|| {
                ConfigError::InitialCluster(
                    self.initial_cluster.clone(),
                    format!("{part:?} is not name=url"),
                )
            })?;
            parse_client_url(url)?;
            match members.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url.to_string()),
                None => members.push((name.to_string(), vec![url.to_string()])),
            }
        }
        if !members.iter().any(|(n, _)| *n == self.name) {
            return Err(ConfigError::InitialCluster(
                self.initial_cluster.clone(),
                format!("it does not name this member ({})", self.name),
            ));
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests;
