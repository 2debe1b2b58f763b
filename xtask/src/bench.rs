//! `cargo xtask bench …`: in-process layer benchmarks and whole-server measurements.

use crate::results::{self, Recorder};
use crate::server::{self, Probe, Server};
use crate::{e2e, layers};
use anyhow::{bail, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use metastore_engine::Engine;
use metastore_memory::MemoryEngine;
use metastore_mvcc::Store;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore_proto::internal::{command::Op, Command};
use metastore_rocksdb::{RocksDbConfig, RocksDbEngine};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `cargo xtask bench [--out DIR] [--no-save] <bench>`.
#[derive(Parser)]
pub struct BenchCmd {
    /// Where result files go (`<date>-<commit>.json` and `.md`).
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
    /// Print only; write no result file.
    #[arg(long, global = true)]
    no_save: bool,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
pub enum Bench {
    /// Codec: our protobuf frames vs serde_json of the same operation, encode + decode.
    Codec(Quick),
    /// Batch proposer alone (batches complete at once): throughput and added latency at
    /// 1 / 16 / 256 producers.
    Batch(Quick),
    /// WAL: appends/s and fsyncs/s, group commit vs one fsync per append, 1 / 16 / 256 writers
    /// of 300-byte records.
    Wal(Quick),
    /// Raft, one member: proposer → raft log (fsynced WAL) → apply, no engine.
    Raft(Quick),
    /// Storage engines under the MVCC store, in process: put, get, range of 100.
    Engine(EngineArgs),
    /// Loads keys into the real server, kills it with SIGKILL and times the restart.
    Restart(RestartArgs),
    /// Whole servers over gRPC: the load matrix against MetaStore (both engines), the no-op
    /// ceiling and, with `--vs-etcd`, etcd.
    E2e(crate::e2e::E2eArgs),
    /// What auth (simple tokens) and TLS cost: put at 256 clients against MetaStore and
    /// etcd, each plain, with auth on, and over TLS.
    Secure(crate::secure::SecureArgs),
    /// Puts of 64 KiB and 1 MiB values against MetaStore and, with `--vs-etcd`, etcd.
    Large(crate::large::LargeArgs),
    /// Loads 100k / 1M / 10M keys into each engine (and etcd): load rate, memory and disk per
    /// key, restart time, get / range-100 / put rates at that size.
    Scale(crate::scale::ScaleArgs),
    /// Kubernetes-shaped load: 50k objects of 1–16 KiB, guarded updates / creates / deletes,
    /// gets, paged lists, a watch per type and compaction, against each engine (and etcd).
    K8s(crate::k8s::K8sBenchArgs),
    /// Every layer bench, then the e2e matrix, in a cut-down form that takes seconds (what CI
    /// runs so the harness cannot rot).
    Smoke(SmokeArgs),
    /// Compares the latest run with `bench-results/baseline.json`; exits 1 on regressions.
    Compare(CompareArgs),
    /// Regenerates the README's performance tables from a run file (default: the latest).
    Readme(ReadmeArgs),
}

#[derive(Parser)]
pub struct ReadmeArgs {
    #[arg(long)]
    run: Option<PathBuf>,
    #[arg(long, default_value = "README.md")]
    readme: PathBuf,
}

#[derive(Parser)]
pub struct Quick {
    /// A few hundred milliseconds instead of seconds.
    #[arg(long)]
    smoke: bool,
}

#[derive(Parser)]
pub struct SmokeArgs {
    /// Directory with the `metastore` and `metastore-bench` binaries (default: build them).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Parser)]
pub struct CompareArgs {
    #[arg(long, default_value = "bench-results/baseline.json")]
    baseline: PathBuf,
    /// The run to check (default: the newest run file beside the baseline).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Percent a metric may get worse before it counts as a regression.
    #[arg(long, default_value_t = 10.0)]
    threshold: f64,
}

#[derive(Parser)]
pub struct EngineArgs {
    /// Keys loaded before reads are measured.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Reads measured per workload.
    #[arg(long, default_value_t = 200_000)]
    reads: u64,
    /// Puts per applied batch (one raft entry in the server).
    #[arg(long, default_value_t = 100)]
    batch: u64,
}

#[derive(Parser)]
pub struct RestartArgs {
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value = "memory")]
    storage: String,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// The server binary (built with `cargo build --release -p metastore-server`).
    #[arg(long, default_value = "target/release/metastore")]
    bin: PathBuf,
}

pub fn run(cmd: BenchCmd, rt: &tokio::runtime::Runtime) -> Result<()> {
    let mut rec = Recorder::new(cmd.out.clone());
    match cmd.bench {
        Bench::Codec(q) => layers::codec(&mut rec, q.smoke)?,
        Bench::Batch(q) => rt.block_on(layers::batch(&mut rec, q.smoke))?,
        Bench::Wal(q) => layers::wal(&mut rec, q.smoke)?,
        Bench::Raft(q) => rt.block_on(layers::raft(&mut rec, q.smoke))?,
        Bench::Engine(args) => engine(args, &mut rec)?,
        Bench::Restart(args) => rt.block_on(restart(args, &mut rec))?,
        Bench::E2e(args) => rt.block_on(e2e::run(args, &mut rec))?,
        Bench::Secure(args) => rt.block_on(crate::secure::run(args, &mut rec))?,
        Bench::Large(args) => rt.block_on(crate::large::run(args, &mut rec))?,
        Bench::Scale(args) => rt.block_on(crate::scale::run(args, &mut rec))?,
        Bench::K8s(args) => rt.block_on(crate::k8s::run(args, &mut rec))?,
        Bench::Smoke(args) => {
            layers::codec(&mut rec, true)?;
            rt.block_on(layers::batch(&mut rec, true))?;
            layers::wal(&mut rec, true)?;
            rt.block_on(layers::raft(&mut rec, true))?;
            engine(
                EngineArgs {
                    keys: 2_000,
                    val_size: 256,
                    reads: 2_000,
                    batch: 100,
                },
                &mut rec,
            )?;
            let e2e_args = e2e::E2eArgs::smoke(args.bin_dir.clone());
            rt.block_on(e2e::run(e2e_args, &mut rec))?;
            let cluster_args = e2e::E2eArgs::smoke(args.bin_dir.clone()).with_cluster(3);
            rt.block_on(e2e::run(cluster_args, &mut rec))?;
            rt.block_on(crate::secure::run(
                crate::secure::SecureArgs::smoke(args.bin_dir.clone()),
                &mut rec,
            ))?;
            rt.block_on(crate::large::run(
                crate::large::LargeArgs::smoke(args.bin_dir.clone()),
                &mut rec,
            ))?;
            rt.block_on(crate::scale::run(
                crate::scale::ScaleArgs::smoke(args.bin_dir.clone()),
                &mut rec,
            ))?;
            rt.block_on(crate::k8s::run(
                crate::k8s::K8sBenchArgs::smoke(args.bin_dir),
                &mut rec,
            ))?;
        }
        Bench::Readme(args) => {
            let run = match args.run {
                Some(p) => p,
                None => results::latest(&cmd.out)?,
            };
            return results::update_readme(&args.readme, &run);
        }
        Bench::Compare(args) => {
            let baseline = results::load(&args.baseline)?;
            let run_path = match args.run {
                Some(p) => p,
                None => results::latest(args.baseline.parent().unwrap_or(Path::new(".")))?,
            };
            let run = results::load(&run_path)?;
            let regressions = results::compare(&baseline, &run, args.threshold);
            if regressions > 0 {
                bail!(
                    "{regressions} metric(s) of {} regressed more than {}% against {}",
                    run_path.display(),
                    args.threshold,
                    args.baseline.display()
                );
            }
            println!("no regressions over {}%", args.threshold);
            return Ok(());
        }
    }
    if cmd.no_save {
        return Ok(());
    }
    rec.save()?;
    Ok(())
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("key/{i:012}"))
}

struct Rates {
    put: f64,
    get: f64,
    range100: f64,
}

fn measure<E: Engine>(engine: Arc<E>, args: &EngineArgs) -> Result<Rates> {
    let store = Store::open(engine).map_err(|e| anyhow::anyhow!("{e}"))?;
    let value = Bytes::from(vec![b'v'; args.val_size]);
    let started = Instant::now();
    let mut index = 0;
    let mut i = 0;
    while i < args.keys {
        let end = (i + args.batch).min(args.keys);
        let cmds: Vec<Command> = (i..end)
            .map(|k| Command {
                auth: None,
                op: Some(Op::Put(PutRequest {
                    key: key(k),
                    value: value.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        index += 1;
        store
            .apply(index, &cmds)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        i = end;
    }
    let put = args.keys as f64 / started.elapsed().as_secs_f64();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = Instant::now();
    for _ in 0..args.reads {
        let r = store
            .range(&RangeRequest {
                key: key(next() % args.keys),
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if r.kvs.len() != 1 {
            bail!("a loaded key is missing");
        }
    }
    let get = args.reads as f64 / started.elapsed().as_secs_f64();
    let ranges = (args.reads / 20).max(1);
    let started = Instant::now();
    for _ in 0..ranges {
        let start = next() % args.keys.saturating_sub(100).max(1);
        let r = store
            .range(&RangeRequest {
                key: key(start),
                range_end: key(start + 100),
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if r.kvs.len() != 100.min(args.keys as usize) {
            bail!("a range of 100 returned {}", r.kvs.len());
        }
    }
    let range100 = ranges as f64 / started.elapsed().as_secs_f64();
    Ok(Rates { put, get, range100 })
}

fn engine(args: EngineArgs, rec: &mut Recorder) -> Result<()> {
    let memory = measure(Arc::new(MemoryEngine::new()), &args)?;
    let dir = layers::scratch_dir()?;
    let rocks = measure(
        Arc::new(
            RocksDbEngine::open(dir.path(), &RocksDbConfig::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        &args,
    )?;
    println!(
        "engine bench: {} keys of {} B, puts applied {} per batch, {} gets, {} ranges of 100",
        args.keys,
        args.val_size,
        args.batch,
        args.reads,
        (args.reads / 20).max(1)
    );
    println!("| engine | put ops/s | get ops/s | range-100 ops/s |");
    println!("|---|---|---|---|");
    for (name, r) in [("memory", &memory), ("rocksdb", &rocks)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            r.put, r.get, r.range100
        );
    }
    for (name, r) in [("memory", &memory), ("rocksdb", &rocks)] {
        rec.add(
            "engine",
            name,
            &[
                ("put_ops_per_sec", r.put),
                ("get_ops_per_sec", r.get),
                ("range100_ops_per_sec", r.range100),
                ("n_keys", args.keys as f64),
            ],
        );
    }
    Ok(())
}

/// A restart replays up to millions of keys; far longer than a fresh start may take.
const RESTART_READY_TIMEOUT: Duration = Duration::from_secs(600);

async fn restart(args: RestartArgs, rec: &mut Recorder) -> Result<()> {
    let dir = layers::scratch_dir()?;
    let port = server::free_port()?;
    let spawn = || -> Result<Server> {
        let child = server::spawn_metastore(&args.bin, dir.path(), &args.storage, port, &[])?;
        Ok(Server::new(child, port, None))
    };
    let server = spawn()?;
    server::wait_ready(port, Probe::StatusAndPut, RESTART_READY_TIMEOUT).await?;
    let client = etcd_client::Client::connect([format!("127.0.0.1:{port}")], None).await?;
    let value = vec![b'v'; args.val_size];
    let load = Instant::now();
    let mut tasks = Vec::new();
    let workers = 64u64;
    for w in 0..workers {
        let mut kv = client.kv_client();
        let value = value.clone();
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < keys {
                kv.put(key(i).to_vec(), value.clone(), None).await?;
                i += workers;
            }
            Ok::<_, etcd_client::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let load = load.elapsed();
    let rss_loaded = server::rss_kb(server.child.id());
    server.kill()?;
    let server = spawn()?;
    let ready = server::wait_ready(port, Probe::StatusAndPut, RESTART_READY_TIMEOUT).await?;
    let mut c = etcd_client::Client::connect([format!("127.0.0.1:{port}")], None).await?;
    let count = server::count_prefix(&mut c, "key/").await?;
    if count != args.keys as i64 {
        bail!("{count} of {} keys after the restart", args.keys);
    }
    let rss_restarted = server::rss_kb(server.child.id());
    println!(
        "restart bench ({}): {} keys of {} B loaded in {:.1}s; after kill -9 ready again in {:.2}s with all keys; RSS {} MB loaded, {} MB after restart",
        args.storage,
        args.keys,
        args.val_size,
        load.as_secs_f64(),
        ready.as_secs_f64(),
        rss_loaded / 1024,
        rss_restarted / 1024
    );
    rec.add(
        "restart",
        &args.storage,
        &[
            ("load_s", load.as_secs_f64()),
            ("restart_ready_s", ready.as_secs_f64()),
            ("rss_loaded_mb", (rss_loaded / 1024) as f64),
            ("rss_restarted_mb", (rss_restarted / 1024) as f64),
            ("n_keys", args.keys as f64),
        ],
    );
    Ok(())
}
