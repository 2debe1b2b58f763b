//! `cargo xtask bench scale`: how a server's cost grows with the keys it holds. For each key
//! count, fresh servers take turns (MetaStore on the memory engine, on RocksDB and, with
//! `--vs-etcd`, etcd): each is loaded with that many 16-byte keys of 256-byte values (txns of
//! 100 puts), then we record the load rate, resident memory and disk bytes per key, the
//! restart after `kill -9` until it serves with every key, and get / range-100 / put rates
//! over the whole key space.

use crate::e2e::metrics_of;
use crate::results::Recorder;
use crate::secure::{certs, command, Mode, Who};
use crate::server::{free_port, rss_kb, wait_for_quiet_machine, wait_ready, Probe, Server};
use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_bench::report::Report;
use metastore_bench::{key_of, value_of, Common, Consistency, RangeArgs, Workload};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY_SIZE: usize = 16;
const VAL_SIZE: usize = 256;
/// Puts per loading txn (etcd refuses more than 128 operations in one txn by default).
const LOAD_TXN_PUTS: u64 = 100;
/// Replaying millions of keys takes a while; a fresh start is ready in well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Parser, Clone)]
pub struct ScaleArgs {
    /// Key counts, each loaded into fresh servers (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [100_000u64, 1_000_000])]
    keys: Vec<u64>,
    /// Seconds each get / range / put run lasts.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Concurrent clients of the loading and of each rate run.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Directory holding release `metastore` (default: `cargo build --release` first).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "etcd")]
    etcd_bin: String,
    /// Also load etcd the same way (its backend quota is raised to 8 GiB).
    #[arg(long)]
    vs_etcd: bool,
    /// Skip MetaStore on RocksDB.
    #[arg(long)]
    no_rocksdb: bool,
}

impl ScaleArgs {
    /// A few thousand keys into each MetaStore engine, rates for a fraction of a second:
    /// keeps the harness from rotting in CI.
    pub fn smoke(bin_dir: Option<PathBuf>) -> Self {
        Self {
            keys: vec![5_000],
            duration: 0.3,
            clients: 8,
            conns: 2,
            bin_dir,
            etcd_bin: "etcd".into(),
            vs_etcd: false,
            no_rocksdb: false,
        }
    }
}

/// A server a case loads: MetaStore on either engine, or etcd.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Memory,
    RocksDb,
    Etcd,
}

impl Target {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Memory => "metastore-memory",
            Target::RocksDb => "metastore-rocksdb",
            Target::Etcd => "etcd",
        }
    }

    /// The targets a case runs: MetaStore's engines, then etcd if asked for.
    pub(crate) fn chosen(rocksdb: bool, etcd: bool) -> Vec<Target> {
        let mut targets = vec![Target::Memory];
        if rocksdb {
            targets.push(Target::RocksDb);
        }
        if etcd {
            targets.push(Target::Etcd);
        }
        targets
    }

    /// Starts this server with its data under `dir` on fixed `ports` (client, peer).
    pub(crate) fn start(
        self,
        bin_dir: &Path,
        etcd_bin: &str,
        dir: &Path,
        ports: (u16, u16),
    ) -> Result<Server> {
        let (who, bin) = match self {
            Target::Etcd => (Who::Etcd, PathBuf::from(etcd_bin)),
            _ => (Who::MetaStore, bin_dir.join("metastore")),
        };
        let certs = certs(dir)?;
        let mut cmd = command(who, Mode::Plain, &bin, dir, ports, &certs);
        if self == Target::RocksDb {
            cmd.args(["--storage", "rocksdb"]);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Server::new(child, ports.0, None))
    }
}

/// What one server showed at one key count.
struct Scaled {
    load_keys_per_sec: f64,
    rss_empty_mb: f64,
    rss_per_key: f64,
    disk_per_key: f64,
    restart_ready_s: f64,
    rss_restarted_per_key: f64,
    get: Report,
    range100: Report,
    put: Report,
}

/// Bytes the files under `dir` take on disk (what `du` says: allocated blocks, so a
/// preallocated WAL segment counts whole and a sparse file only as written).
fn disk_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            disk_bytes(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}

/// Writes keys `0..n` (each with the value the load generator checks for) in txns of
/// [`LOAD_TXN_PUTS`] puts, `clients` at a time over `conns` connections.
async fn load(common: &Common, n: u64) -> Result<Duration> {
    let conns = common.conns.max(1);
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(metastore_bench::connect_client(common).await?);
    }
    let cursor = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..common.clients.max(1) {
        let mut kv = channels[c % conns].kv_client();
        let cursor = cursor.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = cursor.fetch_add(LOAD_TXN_PUTS, Ordering::Relaxed);
                if first >= n {
                    return anyhow::Ok(());
                }
                let puts: Vec<etcd_client::TxnOp> = (first..(first + LOAD_TXN_PUTS).min(n))
                    .map(|i| {
                        let key = key_of(i, KEY_SIZE);
                        let value = value_of(&key, VAL_SIZE);
                        etcd_client::TxnOp::put(key, value, None)
                    })
                    .collect();
                kv.txn(etcd_client::Txn::new().and_then(puts))
                    .await
                    .with_context(|| format!("loading keys from {first}"))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Fails unless the server holds exactly keys `0..n` of the loaded range.
async fn check_count(common: &Common, n: u64) -> Result<()> {
    let mut client = metastore_bench::connect_client(common).await?;
    let options = etcd_client::GetOptions::new()
        .with_range(key_of(n, KEY_SIZE))
        .with_count_only();
    let count = client
        .get(key_of(0, KEY_SIZE), Some(options))
        .await?
        .count();
    if count != n as i64 {
        bail!("the server holds {count} of the {n} loaded keys");
    }
    Ok(())
}

async fn one_target(target: Target, n: u64, bin_dir: &Path, args: &ScaleArgs) -> Result<Scaled> {
    let dir = crate::layers::scratch_dir()?;
    let ports = (free_port()?, free_port()?);
    let start = || target.start(bin_dir, &args.etcd_bin, dir.path(), ports);
    let server = start()?;
    wait_ready(ports.0, Probe::StatusAndPut, READY_TIMEOUT).await?;
    let rss_empty = rss_kb(server.child.id());
    let base = Common {
        endpoints: format!("127.0.0.1:{}", ports.0),
        clients: args.clients,
        conns: args.conns,
        key_size: KEY_SIZE,
        val_size: VAL_SIZE,
        key_space_size: n,
        no_progress: true,
        ..Common::default()
    };
    let took = load(&base, n).await?;
    // Flushes, compactions and etcd's backend commits finish before memory and disk are read.
    wait_for_quiet_machine(0.2, Duration::from_secs(60)).await;
    check_count(&base, n).await?;
    let rss_loaded = rss_kb(server.child.id());
    let disk = disk_bytes(dir.path())?;
    server.kill()?;

    let server = start()?;
    let ready = wait_ready(ports.0, Probe::StatusAndPut, READY_TIMEOUT).await?;
    check_count(&base, n).await?;
    let rss_restarted = rss_kb(server.child.id());
    wait_for_quiet_machine(0.2, Duration::from_secs(60)).await;

    let load_common = Common {
        server_pid: Some(server.child.id()),
        duration: Some(Duration::from_secs_f64(args.duration)),
        ..base
    };
    let range = |span| {
        Workload::Range(RangeArgs {
            consistency: Consistency::L,
            limit: 0,
            prefix: None,
            span,
        })
    };
    let mut reports = Vec::new();
    for workload in [range(0), range(100), Workload::Put] {
        let r = metastore_bench::run(&workload, &load_common).await?;
        if target != Target::Etcd && (r.error_count() > 0 || r.checks.failed > 0) {
            bail!("{} at {n} keys: errors {:?}", target.name(), r.errors);
        }
        reports.push(r);
    }
    server.kill()?;
    let per_key = |kb: u64| kb.saturating_sub(rss_empty) as f64 * 1024.0 / n as f64;
    let mut reports = reports.into_iter();
    let mut next = || reports.next().context("a rate run is missing");
    Ok(Scaled {
        load_keys_per_sec: n as f64 / took.as_secs_f64(),
        rss_empty_mb: rss_empty as f64 / 1024.0,
        rss_per_key: per_key(rss_loaded),
        disk_per_key: disk as f64 / n as f64,
        restart_ready_s: ready.as_secs_f64(),
        rss_restarted_per_key: per_key(rss_restarted),
        get: next()?,
        range100: next()?,
        put: next()?,
    })
}

fn record(rec: &mut Recorder, name: &str, n: u64, s: &Scaled) {
    let raw = (KEY_SIZE + VAL_SIZE) as f64;
    rec.add(
        "scale",
        name,
        &[
            ("n_keys", n as f64),
            ("load_keys_per_sec", s.load_keys_per_sec),
            ("rss_empty_mb", s.rss_empty_mb),
            ("rss_per_key_bytes", s.rss_per_key),
            // RSS per key over the key and value bytes it holds (the "≤ 2× raw").
            ("n_rss_per_raw_byte", s.rss_per_key / raw),
            ("rss_restarted_per_key_bytes", s.rss_restarted_per_key),
            ("disk_per_key_bytes", s.disk_per_key),
            ("restart_ready_s", s.restart_ready_s),
        ],
    );
    for (op, r) in [("get", &s.get), ("range100", &s.range100), ("put", &s.put)] {
        rec.add("scale", &format!("{name}/{op}"), &metrics_of(r));
    }
}

pub async fn run(args: ScaleArgs, rec: &mut Recorder) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::e2e::build_binaries()?,
    };
    let targets = Target::chosen(!args.no_rocksdb, args.vs_etcd);
    println!(
        "{:<30} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "keys/server",
        "load k/s",
        "RSS B/k",
        "disk B/k",
        "restart",
        "get/s",
        "range/s",
        "put/s",
        "put p99"
    );
    for &n in &args.keys {
        if n == 0 {
            bail!("--keys must be positive");
        }
        for &target in &targets {
            let s = one_target(target, n, &bin_dir, &args).await?;
            let name = format!("{n}/{}", target.name());
            println!(
                "{:<30} {:>9.1} {:>8.0} {:>8.0} {:>7.2}s {:>9.0} {:>9.0} {:>9.0} {:>7.2}ms",
                name,
                s.load_keys_per_sec / 1000.0,
                s.rss_per_key,
                s.disk_per_key,
                s.restart_ready_s,
                s.get.ops_per_sec,
                s.range100.ops_per_sec,
                s.put.ops_per_sec,
                s.put.latency_ms.p99
            );
            record(rec, &name, n, &s);
        }
    }
    Ok(())
}
