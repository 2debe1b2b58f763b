//! `cargo xtask bench e2e`: starts real servers one at a time (MetaStore on each engine, the
//! no-op gRPC ceiling, the same no-op answering its Puts from another thread, and etcd with
//! `--vs-etcd`) and runs the load matrix against each through `metastore-bench`.

use crate::results::Recorder;
use crate::server::{self, free_port, wait_for_quiet_machine, wait_ready, Probe, Server};
use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_bench::report::Report;
use metastore_bench::{
    BatchArgs, Common, Consistency, RangeArgs, TxnMixedArgs, TxnPutArgs, WatchLatencyArgs, Workload,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Parser, Clone)]
pub struct E2eArgs {
    /// Also run the matrix against a real etcd (Debian's `etcd-server` is installed if no
    /// `etcd` is on PATH) and print the ratios.
    #[arg(long)]
    vs_etcd: bool,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd_bin: String,
    /// Seconds each workload runs per round.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Rounds per case; servers take turns within a round and the median round is kept.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds, clients and keys cut down so the whole matrix takes seconds (CI).
    #[arg(long)]
    smoke: bool,
    /// Directory holding the `metastore` and `metastore-bench` binaries; by default they are
    /// built with `cargo build --release` first.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Skip the RocksDB-engine runs.
    #[arg(long)]
    memory_only: bool,
    /// Run only these cases (comma-separated names, e.g. `put-c256,put-rate5000`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Instead of the single-member matrix: N-member clusters (writes through the leader and
    /// a follower, linearizable follower reads, failover after `kill -9` of the leader).
    #[arg(long)]
    cluster: Option<usize>,
}

impl E2eArgs {
    /// The cut-down matrix CI runs.
    pub fn smoke(bin_dir: Option<PathBuf>) -> Self {
        Self {
            vs_etcd: false,
            etcd_bin: "etcd".into(),
            duration: 0.3,
            rounds: 1,
            smoke: true,
            bin_dir,
            memory_only: false,
            only: Vec::new(),
            cluster: None,
        }
    }

    /// The same, against `size`-member clusters.
    pub fn with_cluster(mut self, size: usize) -> Self {
        self.cluster = Some(size);
        self
    }
}

fn spawn_metastore(bin_dir: &Path, storage: &str) -> Result<Server> {
    let dir = crate::layers::scratch_dir()?;
    let port = free_port()?;
    let child = server::spawn_metastore(
        &bin_dir.join("metastore"),
        &dir.path().join("data"),
        storage,
        port,
        &["--quota-backend-bytes", QUOTA_BYTES],
    )?;
    Ok(Server::new(child, port, Some(dir)))
}

/// A server under test and what it has been through.
struct Running {
    target: Target,
    server: Server,
    /// The key space was loaded into it (read cases).
    loaded: bool,
    /// It has served a round; a case without reads replaces it with a fresh process.
    used: bool,
}

/// Starts the server of `target` and waits until it answers.
async fn start_target(target: Target, bin_dir: &Path, etcd: Option<&str>) -> Result<Server> {
    let server = match target {
        Target::MetaStore => spawn_metastore(bin_dir, "memory")?,
        Target::MetaStoreRocksDb => spawn_metastore(bin_dir, "rocksdb")?,
        Target::Noop => spawn_noop(bin_dir, false)?,
        Target::NoopDeferred => spawn_noop(bin_dir, true)?,
        Target::Etcd => spawn_etcd(etcd.unwrap_or("etcd"))?,
    };
    let probe = if target.is_noop() {
        Probe::Put
    } else {
        Probe::StatusAndPut
    };
    wait_ready(server.port, probe, READY_TIMEOUT).await?;
    Ok(server)
}

fn spawn_noop(bin_dir: &Path, defer: bool) -> Result<Server> {
    let port = free_port()?;
    let bin = bin_dir.join("metastore-bench");
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["noop-server", "--listen", &listen];
    if defer {
        args.push("--defer");
    }
    let child = Command::new(&bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Server::new(child, port, None))
}

fn ensure_etcd(bin: &str) -> Result<String> {
    let found = |b: &str| {
        Command::new(b)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if found(bin) {
        return Ok(bin.to_string());
    }
    eprintln!("no {bin} found: installing Debian's etcd-server");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "etcd-server"])?;
    for candidate in ["etcd", "/usr/bin/etcd"] {
        if found(candidate) {
            return Ok(candidate.to_string());
        }
    }
    bail!("etcd-server installed but no etcd binary found")
}

fn spawn_etcd(bin: &str) -> Result<Server> {
    let dir = crate::layers::scratch_dir()?;
    let port = free_port()?;
    let peer = free_port()?;
    let child = Command::new(bin)
        .args(["--name", "bench"])
        .args(["--data-dir", &dir.path().join("etcd").to_string_lossy()])
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("bench=http://127.0.0.1:{peer}"),
        ])
        .args(["--logger", "zap", "--log-level", "error"])
        .args(["--quota-backend-bytes", QUOTA_BYTES])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    Ok(Server::new(child, port, Some(dir)))
}

/// Compacts a server's history up to its current revision (physically).
async fn compact(port: u16) -> Result<()> {
    let mut client = etcd_client::Client::connect([format!("127.0.0.1:{port}")], None).await?;
    let revision = client
        .get("compact-probe", None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or_default();
    if revision <= 1 {
        return Ok(());
    }
    match client
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
    {
        // Nothing was written since the last compaction.
        Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => Ok(()),
        other => other.map(|_| ()).map_err(Into::into),
    }
}

/// Backend quota of every server under test: the matrix writes a few GB over its rounds, more
/// than the 2 GiB default; etcd's documented maximum.
const QUOTA_BYTES: &str = "8589934592";
/// A round starts once the machine is below this share of its CPU time busy (or after
/// `QUIET_TIMEOUT`): servers that sit out a round still run background work the previous
/// round or case left them.
const QUIET_MAX_BUSY: f64 = 0.10;
const QUIET_TIMEOUT: Duration = Duration::from_secs(20);
/// A fresh server (MetaStore, etcd or the no-op) serves within this.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One row of the matrix.
struct Case {
    name: &'static str,
    workload: Workload,
    clients: usize,
    conns: usize,
    rate: f64,
    /// Needs the key space loaded first.
    reads: bool,
}

fn matrix(smoke: bool) -> Vec<Case> {
    let c = |name, workload, clients, conns| Case {
        name,
        workload,
        clients,
        conns,
        rate: 0.0,
        reads: false,
    };
    let range = |consistency| {
        Workload::Range(RangeArgs {
            consistency,
            limit: 0,
            prefix: None,
            span: 0,
        })
    };
    let watchers = if smoke { 10 } else { 1000 };
    vec![
        c("put-c1", Workload::Put, 1, 1),
        c("put-c16", Workload::Put, 16, 16),
        c("put-c256", Workload::Put, 256, 100),
        c("put-c1000", Workload::Put, 1000, 100),
        Case {
            reads: true,
            ..c("range-l-c256", range(Consistency::L), 256, 100)
        },
        Case {
            reads: true,
            ..c("range-s-c256", range(Consistency::S), 256, 100)
        },
        c(
            "txn-put-c256",
            Workload::TxnPut(TxnPutArgs { txn_ops: 1 }),
            256,
            100,
        ),
        Case {
            reads: true,
            ..c(
                "txn-mixed-90r-c256",
                Workload::TxnMixed(TxnMixedArgs {
                    rw_ratio: 9.0,
                    consistency: Consistency::L,
                }),
                256,
                100,
            )
        },
        Case {
            rate: if smoke { 500.0 } else { 5000.0 },
            ..c("put-rate5000", Workload::Put, 64, 16)
        },
        c(
            "watch-latency",
            Workload::WatchLatency(WatchLatencyArgs {
                streams: 10,
                watchers_per_stream: watchers,
                put_total: if smoke { 20 } else { 2000 },
            }),
            1,
            1,
        ),
        c(
            "batch-put",
            Workload::BatchPut(BatchArgs { batch_size: 1000 }),
            4,
            4,
        ),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    MetaStore,
    MetaStoreRocksDb,
    Noop,
    /// The no-op answering each Put from another thread: what waiting for a commit costs by
    /// itself, so a gap to the ceiling can be split into that and MetaStore's own work.
    NoopDeferred,
    Etcd,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::MetaStore => "metastore",
            Target::MetaStoreRocksDb => "metastore-rocksdb",
            Target::Noop => "noop",
            Target::NoopDeferred => "noop-deferred",
            Target::Etcd => "etcd",
        }
    }

    fn is_noop(self) -> bool {
        matches!(self, Target::Noop | Target::NoopDeferred)
    }

    fn runs(self, case: &str) -> bool {
        match self {
            Target::MetaStore => true,
            Target::MetaStoreRocksDb => matches!(case, "put-c1" | "put-c256" | "range-s-c256"),
            Target::Noop => matches!(case, "put-c1" | "put-c256" | "range-s-c256"),
            Target::NoopDeferred => case == "put-c256",
            Target::Etcd => case != "batch-put",
        }
    }
}

pub(crate) fn build_binaries() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release binaries (metastore, metastore-bench)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "metastore-server",
            "-p",
            "metastore-bench",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    Ok(target.join("release"))
}

pub(crate) fn metrics_of(report: &Report) -> Vec<(&'static str, f64)> {
    let l = &report.latency_ms;
    let mut m = vec![
        ("ops_per_sec", report.ops_per_sec),
        ("p50_ms", l.p50),
        ("p90_ms", l.p90),
        ("p99_ms", l.p99),
        ("p999_ms", l.p999),
        ("max_ms", l.max),
        ("errors", report.error_count() as f64),
        ("check_failures", report.checks.failed as f64),
    ];
    if (report.items_per_sec - report.ops_per_sec).abs() > 0.5 {
        m.push(("keys_per_sec", report.items_per_sec));
    }
    if let Some(c) = report.server_cpu_us_per_op {
        m.push(("server_cpu_us", c));
    }
    if let Some(c) = report.client_cpu_us_per_op {
        m.push(("client_cpu_us", c));
    }
    // Informational (`n_`): idle CPU is what neither loadgen nor server turned into work, which
    // explains a throughput gap that CPU per op does not.
    if let Some(idle) = report.machine_idle_share {
        m.push(("n_machine_idle_pct", idle * 100.0));
    }
    m
}

/// The round whose throughput is the median (for paced or latency-only cases: whose p99 is).
fn median(mut reports: Vec<Report>, by_latency: bool) -> Option<(Report, f64)> {
    let key = |r: &Report| {
        if by_latency {
            r.latency_ms.p99
        } else {
            r.ops_per_sec
        }
    };
    reports.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let spread = match (reports.first(), reports.last()) {
        (Some(lo), Some(hi)) if key(lo) > 0.0 => key(hi) / key(lo),
        _ => 1.0,
    };
    let mid = reports.len() / 2;
    reports.into_iter().nth(mid).map(|r| (r, spread))
}

pub async fn run(args: E2eArgs, rec: &mut Recorder) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => build_binaries()?,
    };
    let etcd = if args.vs_etcd {
        Some(ensure_etcd(&args.etcd_bin)?)
    } else {
        None
    };
    let duration = Duration::from_secs_f64(if args.smoke {
        args.duration.min(0.3)
    } else {
        args.duration
    });
    if let Some(size) = args.cluster {
        return crate::cluster::run(size, &bin_dir, etcd.as_deref(), duration, args.smoke, rec)
            .await;
    }
    let rounds = if args.smoke { 1 } else { args.rounds.max(1) };
    let key_space: u64 = if args.smoke { 1_000 } else { 100_000 };
    let mut kinds = vec![Target::MetaStore];
    if !args.memory_only {
        kinds.push(Target::MetaStoreRocksDb);
    }
    kinds.push(Target::Noop);
    kinds.push(Target::NoopDeferred);
    if etcd.is_some() {
        kinds.push(Target::Etcd);
    }
    // Each case goes round by round through the servers, so a drift of the machine's speed
    // (large on shared VMs) hits every server alike. Servers of read cases keep running (their
    // key space is loaded once); for every other case each round gets fresh server processes:
    // this VM's slow spells stick to a process, and one slow process must not be every round
    // of a case.
    let mut servers = Vec::new();
    for target in kinds {
        let server = start_target(target, &bin_dir, etcd.as_deref()).await?;
        servers.push(Running {
            target,
            server,
            loaded: false,
            used: false,
        });
    }
    let mut results: Vec<(Target, &'static str, Report)> = Vec::new();
    let mut failures = Vec::new();
    for case in matrix(args.smoke) {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == case.name) {
            continue;
        }
        let mut per_target: Vec<(Target, Vec<Report>)> = Vec::new();
        let (mut settle_waited, mut unquiet_rounds) = (Duration::ZERO, 0usize);
        for _ in 0..rounds {
            for Running {
                target,
                server,
                loaded,
                used,
            } in servers.iter_mut()
            {
                let target = *target;
                if !target.runs(case.name) {
                    continue;
                }
                if !case.reads && *used {
                    let old = std::mem::replace(
                        server,
                        start_target(target, &bin_dir, etcd.as_deref()).await?,
                    );
                    old.kill()
                        .with_context(|| format!("stopping {}", target.label()))?;
                    *loaded = false;
                }
                *used = true;
                let base = Common {
                    endpoints: format!("127.0.0.1:{}", server.port),
                    key_space_size: key_space,
                    server_pid: Some(server.child.id()),
                    no_progress: true,
                    ..Common::default()
                };
                if case.reads && !*loaded && !target.is_noop() {
                    // Every key of the key space, once, so reads find (and check) values.
                    let load = Common {
                        clients: 64,
                        conns: 16,
                        total: key_space,
                        sequential_keys: true,
                        check_every: 0,
                        server_pid: None,
                        ..base.clone()
                    };
                    let r = metastore_bench::run(&Workload::Put, &load).await?;
                    if r.error_count() > 0 {
                        bail!(
                            "loading the key space into {} failed: {:?}",
                            target.label(),
                            r.errors
                        );
                    }
                    *loaded = true;
                }
                if !args.smoke {
                    let (waited, quiet) =
                        wait_for_quiet_machine(QUIET_MAX_BUSY, QUIET_TIMEOUT).await;
                    settle_waited += waited;
                    if !quiet {
                        unquiet_rounds += 1;
                    }
                }
                let scale = |n: usize| if args.smoke { n.min(8) } else { n };
                let common = Common {
                    // The no-op server stores nothing, so there is nothing to read back.
                    check_every: if target.is_noop() {
                        0
                    } else {
                        base.check_every
                    },
                    clients: scale(case.clients),
                    conns: scale(case.conns),
                    duration: Some(duration),
                    rate: case.rate,
                    ..base.clone()
                };
                let report = metastore_bench::run(&case.workload, &common)
                    .await
                    .with_context(|| format!("{} against {}", case.name, target.label()))?;
                if target != Target::Etcd && (report.error_count() > 0 || report.checks.failed > 0)
                {
                    failures.push(format!(
                        "{} {}: errors {:?}, checks {:?}",
                        target.label(),
                        case.name,
                        report.errors,
                        report.checks
                    ));
                }
                match per_target.iter_mut().find(|(t, _)| *t == target) {
                    Some((_, v)) => v.push(report),
                    None => per_target.push((target, vec![report])),
                }
            }
        }
        // As deployments do (Kubernetes compacts every 5 minutes): drop the history each case
        // left behind, so no server carries an ever longer history into the next case.
        for Running { target, server, .. } in &servers {
            if !target.is_noop() {
                compact(server.port)
                    .await
                    .with_context(|| format!("compacting {}", target.label()))?;
            }
        }
        if !args.smoke {
            println!(
                "{}: waited {:.1} s in all for a quiet machine before its rounds; {unquiet_rounds} round(s) started busy after {} s",
                case.name,
                settle_waited.as_secs_f64(),
                QUIET_TIMEOUT.as_secs()
            );
        }
        let by_latency = case.rate > 0.0 || case.name == "watch-latency";
        for (target, reports) in per_target {
            let Some((report, spread)) = median(reports, by_latency) else {
                continue;
            };
            println!(
                "{:<18} {:<20} {:>9.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  server CPU {:>6} µs/op  machine idle {:>4} %  errors {}  check failures {}  (median of {rounds}, spread ×{spread:.2})",
                target.label(),
                case.name,
                report.ops_per_sec,
                report.latency_ms.p50,
                report.latency_ms.p99,
                report.latency_ms.p999,
                report
                    .server_cpu_us_per_op
                    .map(|c| format!("{c:.1}"))
                    .unwrap_or_else(|| "-".into()),
                report
                    .machine_idle_share
                    .map(|i| format!("{:.0}", i * 100.0))
                    .unwrap_or_else(|| "-".into()),
                report.error_count(),
                report.checks.failed
            );
            let mut metrics = metrics_of(&report);
            metrics.push(("n_rounds", rounds as f64));
            metrics.push(("n_round_spread", spread));
            // Of all servers' rounds of this case: how many began on a still busy machine.
            metrics.push(("n_rounds_started_busy", unquiet_rounds as f64));
            rec.add(
                "e2e",
                &format!("{}/{}", target.label(), case.name),
                &metrics,
            );
            results.push((target, case.name, report));
        }
    }
    drop(servers);
    // Ratios of MetaStore to etcd and to the ceiling, case by case.
    for (_, name, ours) in results.iter().filter(|(t, ..)| *t == Target::MetaStore) {
        for other in [Target::Etcd, Target::Noop, Target::NoopDeferred] {
            let Some((_, _, theirs)) = results.iter().find(|(ot, n, _)| *ot == other && n == name)
            else {
                continue;
            };
            let throughput = ours.ops_per_sec / theirs.ops_per_sec.max(1e-9);
            let p99 = ours.latency_ms.p99 / theirs.latency_ms.p99.max(1e-9);
            println!(
                "metastore vs {:<13} {name:<20} throughput ×{throughput:.2}  p99 ×{p99:.2}",
                other.label()
            );
            rec.add(
                "e2e",
                &format!("metastore-vs-{}/{name}", other.label()),
                &[("throughput_ratio", throughput), ("n_p99_ratio", p99)],
            );
        }
    }
    if !failures.is_empty() {
        bail!("MetaStore runs had errors:\n{}", failures.join("\n"));
    }
    Ok(())
}
