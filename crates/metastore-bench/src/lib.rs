//! A load generator with the workloads and flags of etcd's `benchmark` tool, for MetaStore or
//! any etcd endpoint (it talks through the `etcd-client` crate; `batch-put`/`batch-get` use
//! MetaStore's batch API).
//!
//! Closed loop by default: `--clients` tasks each keep one request in flight over `--conns`
//! gRPC connections. With `--rate` it is open loop: a pacer thread releases requests at the
//! given rate and each latency is measured from the moment its request was *due*, so a slow
//! server cannot hide its queueing (no coordinated omission).

pub mod cpu;
mod k8s;
pub mod noop;
pub mod report;
mod tls;
mod watch;
mod workers;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use report::{Outcome, Recorder, Report};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use k8s::K8sArgs;
pub use report::Latency;

/// Flags every workload shares (etcd benchmark's global flags plus ours).
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Comma-separated endpoints (`host:port`).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    pub endpoints: String,
    /// gRPC connections the clients share.
    #[arg(long, global = true, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, global = true, default_value_t = 1)]
    pub clients: usize,
    /// Requests to send (ignored with `--duration`).
    #[arg(long, global = true, default_value_t = 10_000)]
    pub total: u64,
    /// Run for this long instead of `--total` requests (`10s`, `500ms`, `2m`).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Open loop: requests per second released by a pacer (0 = closed loop, as fast as the
    /// clients go).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, global = true, default_value_t = 8)]
    pub key_size: usize,
    #[arg(long, global = true, default_value_t = 256)]
    pub val_size: usize,
    /// Keys are drawn from `0..key-space-size`.
    #[arg(long, global = true, default_value_t = 100_000)]
    pub key_space_size: u64,
    /// Walk the key space in order instead of drawing keys at random.
    #[arg(long, global = true)]
    pub sequential_keys: bool,
    /// Check one in this many answers (values read; writes read back afterwards); 0 = never.
    #[arg(long, global = true, default_value_t = 100)]
    pub check_every: u64,
    /// The server's process id: its CPU time over the run is reported per operation.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// Authenticate as `name:password` (etcd's auth; one token per connection).
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Speak TLS, trusting this CA (PEM).
    #[arg(long, global = true)]
    pub cacert: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for servers that ask for one.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            endpoints: "127.0.0.1:2379".into(),
            conns: 1,
            clients: 1,
            total: 10_000,
            duration: None,
            rate: 0.0,
            key_size: 8,
            val_size: 256,
            key_space_size: 100_000,
            sequential_keys: false,
            check_every: 100,
            server_pid: None,
            json: false,
            no_progress: true,
            user: None,
            cacert: None,
            cert: None,
            key: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Linearizable (a ReadIndex round per read batch).
    L,
    /// Serializable (local read).
    S,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Workload {
    /// Puts of `--val-size` values to keys of the key space.
    Put,
    /// Reads of single keys of the key space, or of one prefix range.
    Range(RangeArgs),
    /// Txns that compare a key's mod revision, then put `--txn-ops` keys.
    TxnPut(TxnPutArgs),
    /// Txns that each read or write one key, `--rw-ratio` reads per write.
    TxnMixed(TxnMixedArgs),
    /// Creates watchers over several streams (measures creation), then puts to the watched keys
    /// and counts the events that arrive.
    Watch(WatchArgs),
    /// Put → event latency with many watchers over several streams.
    WatchLatency(WatchLatencyArgs),
    /// Each client keeps a lease alive; measures keep-alive round trips.
    LeaseKeepalive,
    /// MetaStore's `BatchPut`: `--batch-size` distinct keys per request, one raft proposal.
    BatchPut(BatchArgs),
    /// MetaStore's `BatchGet`: `--batch-size` keys per request, read at one revision.
    BatchGet(BatchArgs),
    /// What kube-apiserver asks of etcd: 1–16 KiB objects under `/registry/`, guarded
    /// updates / creates / deletes, quorum gets, paged lists at a pinned revision, a watch per
    /// type and periodic compaction. Needs an empty `/registry/`.
    K8s(K8sArgs),
}

#[derive(Args, Clone, Debug)]
pub struct RangeArgs {
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Most keys per answer (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Read every key under this prefix in each request instead of single keys.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Read this many consecutive keys of the key space, from a key drawn as single reads
    /// draw theirs, in each request instead of single keys (0 = single keys).
    #[arg(long, default_value_t = 0, conflicts_with = "prefix")]
    pub span: u64,
}

#[derive(Args, Clone, Debug)]
pub struct TxnPutArgs {
    /// Puts per txn.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: usize,
}

#[derive(Args, Clone, Debug)]
pub struct TxnMixedArgs {
    /// Reads per write.
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
}

#[derive(Args, Clone, Debug)]
pub struct WatchArgs {
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    #[arg(long, default_value_t = 100)]
    pub watch_per_stream: usize,
    /// Distinct keys the watchers are spread over.
    #[arg(long, default_value_t = 100)]
    pub watched_key_total: usize,
    /// Puts after the watchers are created (each reaches every watcher of its key).
    #[arg(long, default_value_t = 1000)]
    pub put_total: usize,
}

#[derive(Args, Clone, Debug)]
pub struct WatchLatencyArgs {
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    #[arg(long, default_value_t = 100)]
    pub watchers_per_stream: usize,
    /// Puts measured (one at a time, so no event waits behind another).
    #[arg(long, default_value_t = 1000)]
    pub put_total: usize,
}

#[derive(Args, Clone, Debug)]
pub struct BatchArgs {
    /// Keys per request (at most 1,000).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Key `i` of the key space: zero-padded decimal, `size` bytes (more if `i` needs them).
pub fn key_of(i: u64, size: usize) -> Vec<u8> {
    format!("{i:0size$}").into_bytes()
}

/// The value this tool writes under `key`: the key repeated to `size` bytes, so any reader
/// can tell whether a value it gets back is the one written for that key.
pub fn value_of(key: &[u8], size: usize) -> Vec<u8> {
    if key.is_empty() {
        return vec![b'v'; size];
    }
    key.iter().copied().cycle().take(size).collect()
}

/// Picks keys for one client: sequential over the key space (shared cursor) or random.
pub(crate) struct KeyPicker {
    seed: u64,
    space: u64,
    sequential: bool,
}

impl KeyPicker {
    pub(crate) fn new(client: usize, common: &Common) -> Self {
        Self {
            seed: 0x9e37_79b9_7f4a_7c15u64
                ^ (client as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            space: common.key_space_size.max(1),
            sequential: common.sequential_keys,
        }
    }

    pub(crate) fn next(&mut self, seq: u64) -> u64 {
        if self.sequential {
            return seq % self.space;
        }
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed % self.space
    }
}

/// Runs one workload and returns its report.
pub async fn run(workload: &Workload, common: &Common) -> Result<Report> {
    if common.clients == 0 || common.conns == 0 {
        bail!("--clients and --conns must be positive");
    }
    if common.rate < 0.0 || !common.rate.is_finite() {
        bail!("--rate must be a non-negative number");
    }
    match workload {
        Workload::Watch(args) => watch::watch(args, common).await,
        Workload::WatchLatency(args) => watch::watch_latency(args, common).await,
        Workload::K8s(args) => k8s::k8s(args, common).await,
        _ => drive(workload, common).await,
    }
}

/// A client set up as the load's connections are (user, TLS).
pub async fn connect_client(common: &Common) -> Result<etcd_client::Client> {
    connect(common).await
}

pub(crate) async fn connect(common: &Common) -> Result<etcd_client::Client> {
    let endpoints: Vec<String> = common
        .endpoints
        .split(',')
        .map(|e| e.trim().to_string())
        .collect();
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(30));
    if let Some((name, password)) = common.user.as_deref().and_then(|u| u.split_once(':')) {
        options = options.with_user(name, password);
    }
    if let Some(ca) = &common.cacert {
        let first = endpoints.first().cloned().unwrap_or_default();
        let channel = tls::channel(&first, ca, common.cert.as_deref(), common.key.as_deref())?;
        return etcd_client::Client::from_channel(
            etcd_client::Channel::Tonic(channel),
            Some(options),
        )
        .await
        .with_context(|| format!("connecting over TLS to {first}"));
    }
    etcd_client::Client::connect(&endpoints, Some(options))
        .await
        .with_context(|| format!("connecting to {}", common.endpoints))
}

/// The closed/open-loop driver shared by the request/response workloads.
async fn drive(workload: &Workload, common: &Common) -> Result<Report> {
    let mut conns = Vec::with_capacity(common.conns);
    for _ in 0..common.conns {
        conns.push(connect(common).await?);
    }
    let mut batch_conns = Vec::new();
    if matches!(workload, Workload::BatchPut(_) | Workload::BatchGet(_)) {
        let first = common.endpoints.split(',').next().unwrap_or_default();
        for _ in 0..common.conns {
            batch_conns.push(metastore_client::BatchClient::connect(first).await?);
        }
    }
    let mut workers = Vec::with_capacity(common.clients);
    for c in 0..common.clients {
        let conn = &conns[c % conns.len()];
        let batch = batch_conns.get(c % conns.len().max(1)).cloned();
        workers.push(workers::Worker::new(workload, common, c, conn, batch).await?);
    }

    let deadline = common.duration.map(|d| Instant::now() + d);
    let total = if common.duration.is_some() {
        u64::MAX
    } else {
        common.total
    };
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = report::Progress::start(common, done.clone());

    let cpu_mark = cpu::CpuMark::now(common.server_pid);
    let start = Instant::now();

    // Open loop: a pacer thread hands out due times; clients take them as they become free.
    let pacer = if common.rate > 0.0 {
        let (tx, rx) = async_channel::unbounded::<Instant>();
        let rate = common.rate;
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let begin = Instant::now();
                let mut i: u64 = 0;
                while i < total && !stop.load(Ordering::Relaxed) {
                    let due = begin + interval.mul_f64(i as f64);
                    if deadline.is_some_and(|d| due >= d) {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        // std's sleep is precise to tens of µs, unlike tokio's 1 ms timer.
                        std::thread::sleep(due - now);
                    }
                    if tx.send_blocking(due).is_err() {
                        break;
                    }
                    i += 1;
                }
            })
            .context("starting the pacer thread")?;
        Some(rx)
    } else {
        None
    };

    let mut tasks = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let (issued, done, stop, pacer) =
            (issued.clone(), done.clone(), stop.clone(), pacer.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (started, seq) = match &pacer {
                    Some(rx) => match rx.recv().await {
                        Ok(due) => (due, issued.fetch_add(1, Ordering::Relaxed)),
                        Err(_) => break,
                    },
                    None => {
                        let seq = issued.fetch_add(1, Ordering::Relaxed);
                        if seq >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        (Instant::now(), seq)
                    }
                };
                let outcome = worker.step(seq).await;
                rec.record(started.elapsed(), outcome);
                done.fetch_add(1, Ordering::Relaxed);
            }
            (worker, rec)
        }));
    }
    let mut rec = Recorder::new();
    let mut finished = Vec::new();
    for t in tasks {
        let (worker, r) = t.await.context("client task panicked")?;
        rec.merge(r);
        finished.push(worker);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let cpu_use = cpu_mark.elapsed();
    progress.finish();

    // Read back a sample of what was written.
    for worker in &mut finished {
        worker.verify_writes(&mut rec).await;
    }
    for worker in finished {
        worker.close().await;
    }

    Ok(Report::build(
        workload_name(workload),
        params(workload, common),
        rec,
        elapsed,
        cpu_use,
    ))
}

pub fn workload_name(w: &Workload) -> &'static str {
    match w {
        Workload::Put => "put",
        Workload::Range(_) => "range",
        Workload::TxnPut(_) => "txn-put",
        Workload::TxnMixed(_) => "txn-mixed",
        Workload::Watch(_) => "watch",
        Workload::WatchLatency(_) => "watch-latency",
        Workload::LeaseKeepalive => "lease-keepalive",
        Workload::BatchPut(_) => "batch-put",
        Workload::BatchGet(_) => "batch-get",
        Workload::K8s(_) => "k8s",
    }
}

fn params(w: &Workload, c: &Common) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let mut p = serde_json::Map::new();
    p.insert("clients".into(), json!(c.clients));
    p.insert("conns".into(), json!(c.conns));
    match c.duration {
        Some(d) => p.insert("duration_s".into(), json!(d.as_secs_f64())),
        None => p.insert("total".into(), json!(c.total)),
    };
    if c.rate > 0.0 {
        p.insert("rate".into(), json!(c.rate));
    }
    p.insert("key_size".into(), json!(c.key_size));
    p.insert("val_size".into(), json!(c.val_size));
    p.insert("key_space_size".into(), json!(c.key_space_size));
    if c.sequential_keys {
        p.insert("sequential_keys".into(), json!(true));
    }
    match w {
        Workload::Range(a) => {
            p.insert("consistency".into(), json!(format!("{:?}", a.consistency)));
            if a.limit > 0 {
                p.insert("limit".into(), json!(a.limit));
            }
            if let Some(prefix) = &a.prefix {
                p.insert("prefix".into(), json!(prefix));
            }
        }
        Workload::TxnPut(a) => {
            p.insert("txn_ops".into(), json!(a.txn_ops));
        }
        Workload::TxnMixed(a) => {
            p.insert("rw_ratio".into(), json!(a.rw_ratio));
            p.insert("consistency".into(), json!(format!("{:?}", a.consistency)));
        }
        Workload::BatchPut(a) | Workload::BatchGet(a) => {
            p.insert("batch_size".into(), json!(a.batch_size));
        }
        _ => {}
    }
    p
}

/// Error label of a failed etcd-client call: the gRPC code, or the kind of transport failure.
pub(crate) fn error_label(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}", s.code()),
        etcd_client::Error::TransportError(_) => "Transport".into(),
        _ => "Client".into(),
    }
}

pub(crate) fn status_label(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

pub(crate) fn fail(label: String) -> Outcome {
    Outcome::Failed(label)
}
