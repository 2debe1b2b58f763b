//! In-process layer benchmarks: codec, batch proposer, WAL, raft (propose → apply).

use crate::results::Recorder;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use metastore_batch::{BatchConfig, BatchProposer, Completer, ProposalRefused, ProposalSink};
use metastore_codec::{decode_batch, decode_command, encode_batch, encode_command, Batch};
use metastore_proto::etcdserverpb::PutRequest;
use metastore_proto::internal::{command::Op, Command};
use metastore_raft::{CommittedEntry, NoPeers, RaftConfig, RaftNode, StateMachine};
use metastore_wal::{Committer, Wal, WalOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn put_command(i: u64, val_size: usize) -> Command {
    Command {
        auth: None,
        op: Some(Op::Put(PutRequest {
            key: Bytes::from(format!("{i:08}")),
            value: Bytes::from(vec![b'v'; val_size]),
            lease: 0,
            prev_kv: false,
            ignore_value: false,
            ignore_lease: false,
        })),
    }
}

/// A JSON-encoded internal operation (the original plans' format) with keys and values as
/// strings: JSON's most favourable case, only possible when keys and values are UTF-8.
#[derive(Serialize, Deserialize)]
struct JsonPut {
    op: String,
    key: String,
    value: String,
    lease: i64,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

/// The same operation with keys and values as bytes, which is what they are in etcd:
/// serde's representation of `Vec<u8>` in JSON (an array of numbers).
#[derive(Serialize, Deserialize)]
struct JsonPutBytes {
    op: String,
    key: Vec<u8>,
    value: Vec<u8>,
    lease: i64,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

#[derive(Serialize, Deserialize)]
struct JsonBatch {
    id: u64,
    commands: Vec<JsonPut>,
}

fn json_put(i: u64, val_size: usize) -> JsonPut {
    JsonPut {
        op: "put".into(),
        key: format!("{i:08}"),
        value: "v".repeat(val_size),
        lease: 0,
        prev_kv: false,
        ignore_value: false,
        ignore_lease: false,
    }
}

/// Times `f` over `iterations` calls; ns per call.
fn time_ns(iterations: u64, mut f: impl FnMut(u64) -> Result<()>) -> Result<f64> {
    // Warm caches and allocators first.
    for i in 0..iterations.min(1000) {
        f(i)?;
    }
    let started = Instant::now();
    for i in 0..iterations {
        f(i)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / iterations as f64)
}

pub fn codec(rec: &mut Recorder, smoke: bool) -> Result<()> {
    let iterations = if smoke { 2_000 } else { 500_000 };
    let val_size = 256;
    let mut sink = 0usize;

    // One command, encoded and decoded.
    let cmd = put_command(42, val_size);
    let proto_bytes = encode_command(&cmd).len();
    let proto_ns = time_ns(iterations, |_| {
        let frame = encode_command(&cmd);
        let back = decode_command(&frame).map_err(|e| anyhow!("{e}"))?;
        sink += usize::from(back.op.is_some());
        Ok(())
    })?;
    let json = json_put(42, val_size);
    let json_bytes = serde_json::to_vec(&json)?.len();
    let json_ns = time_ns(iterations, |_| {
        let text = serde_json::to_vec(&json)?;
        let back: JsonPut = serde_json::from_slice(&text)?;
        sink += back.key.len();
        Ok(())
    })?;
    let raw = JsonPutBytes {
        op: "put".into(),
        key: json.key.clone().into_bytes(),
        value: json.value.clone().into_bytes(),
        lease: 0,
        prev_kv: false,
        ignore_value: false,
        ignore_lease: false,
    };
    let raw_bytes = serde_json::to_vec(&raw)?.len();
    let raw_ns = time_ns(iterations, |_| {
        let text = serde_json::to_vec(&raw)?;
        let back: JsonPutBytes = serde_json::from_slice(&text)?;
        sink += back.value.len();
        Ok(())
    })?;
    println!(
        "codec put-command: protobuf {proto_ns:.0} ns ({proto_bytes} B); serde_json with byte fields {raw_ns:.0} ns ({raw_bytes} B): {:.1}× faster; serde_json with text fields {json_ns:.0} ns ({json_bytes} B): {:.1}× faster",
        raw_ns / proto_ns,
        json_ns / proto_ns
    );
    rec.add(
        "codec",
        "put-command",
        &[
            ("proto_encode_decode_ns", proto_ns),
            ("json_bytes_encode_decode_ns", raw_ns),
            ("json_text_encode_decode_ns", json_ns),
            ("speedup", raw_ns / proto_ns),
            ("speedup_vs_text_json", json_ns / proto_ns),
            ("proto_bytes", proto_bytes as f64),
            ("json_bytes_bytes", raw_bytes as f64),
            ("json_text_bytes", json_bytes as f64),
        ],
    );

    // A raft entry's frame of 100 commands (the codec's compression left at its defaults).
    let batch = Batch {
        id: 7,
        commands: (0..100).map(|i| put_command(i, val_size)).collect(),
    };
    let opts = metastore_codec::CodecOptions::default();
    let frame_bytes = encode_batch(&batch, &opts).len();
    let batch_iters = (iterations / 100).max(10);
    let proto_ns = time_ns(batch_iters, |_| {
        let frame = encode_batch(&batch, &opts);
        let back = decode_batch(&frame).map_err(|e| anyhow!("{e}"))?;
        sink += back.commands.len();
        Ok(())
    })?;
    let json_batch = JsonBatch {
        id: 7,
        commands: (0..100).map(|i| json_put(i, val_size)).collect(),
    };
    let json_bytes = serde_json::to_vec(&json_batch)?.len();
    let json_ns = time_ns(batch_iters, |_| {
        let text = serde_json::to_vec(&json_batch)?;
        let back: JsonBatch = serde_json::from_slice(&text)?;
        sink += back.commands.len();
        Ok(())
    })?;
    println!(
        "codec batch-100: frame {proto_ns:.0} ns ({frame_bytes} B), serde_json with text fields {json_ns:.0} ns ({json_bytes} B): {:.1}× faster",
        json_ns / proto_ns
    );
    rec.add(
        "codec",
        "batch-100",
        &[
            ("proto_encode_decode_ns", proto_ns),
            ("json_text_encode_decode_ns", json_ns),
            ("speedup_vs_text_json", json_ns / proto_ns),
            ("proto_bytes", frame_bytes as f64),
            ("json_text_bytes", json_bytes as f64),
        ],
    );
    std::hint::black_box(sink);
    Ok(())
}

/// Latency samples of many tasks: percentiles in ms.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let pick = |p: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (pick(0.5), pick(0.99))
}

/// Completes every batch at once: the proposer's own cost, nothing behind it.
struct InstantSink(OnceLock<Completer<()>>);

impl ProposalSink for InstantSink {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        let result = decode_batch(&frame)
            .map_err(|e| Arc::new(e) as ProposalRefused)
            .map(|b| {
                if let Some(c) = self.0.get() {
                    c.complete(b.id, vec![(); b.commands.len()]);
                }
            });
        Box::pin(async move { result })
    }
}

/// What a proposer run measured.
struct ProposerRun {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    commands_per_batch: f64,
}

/// Runs `producers` tasks that each submit commands one at a time for `duration`.
async fn drive_proposer(
    proposer: Arc<BatchProposer<()>>,
    producers: usize,
    duration: Duration,
    val_size: usize,
) -> Result<ProposerRun> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for p in 0..producers {
        let (proposer, stop) = (proposer.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = p as u64;
            while !stop.load(Ordering::Relaxed) {
                let cmd = put_command(i, val_size);
                let t = Instant::now();
                proposer.submit(cmd).await.map_err(|e| anyhow!("{e}"))?;
                lat.push(t.elapsed());
                i += producers as u64;
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    let stats = proposer.stats();
    let batches = stats.batches.load(Ordering::Relaxed).max(1);
    let ops_per_sec = all.len() as f64 / elapsed.as_secs_f64();
    let (p50, p99) = percentiles(all);
    Ok(ProposerRun {
        ops_per_sec,
        p50_us: p50 * 1000.0,
        p99_us: p99 * 1000.0,
        commands_per_batch: stats.commands.load(Ordering::Relaxed) as f64 / batches as f64,
    })
}

pub async fn batch(rec: &mut Recorder, smoke: bool) -> Result<()> {
    let duration = Duration::from_millis(if smoke { 200 } else { 3000 });
    for producers in [1usize, 16, 256] {
        let mut runs = Vec::new();
        for _ in 0..rounds(smoke) {
            let sink = Arc::new(InstantSink(OnceLock::new()));
            let proposer = Arc::new(BatchProposer::start(BatchConfig::default(), sink.clone()));
            let _ = sink.0.set(proposer.completer());
            runs.push(drive_proposer(proposer, producers, duration, 256).await?);
        }
        let (run, spread) = median_run(runs, |r| r.ops_per_sec)?;
        println!(
            "batch producers={producers}: {:.0} commands/s, submit→result p50 {:.1} µs p99 {:.1} µs, {:.1} commands per batch (median of {}, spread ×{spread:.2})",
            run.ops_per_sec, run.p50_us, run.p99_us, run.commands_per_batch, rounds(smoke)
        );
        rec.add(
            "batch",
            &format!("producers-{producers}"),
            &[
                ("ops_per_sec", run.ops_per_sec),
                ("p50_us", run.p50_us),
                ("p99_us", run.p99_us),
                ("n_commands_per_batch", run.commands_per_batch),
                ("n_spread", spread),
            ],
        );
    }
    Ok(())
}

/// Rounds per layer configuration: single samples on a shared VM varied by ±20–60 %, so each
/// configuration runs this often and the round with the median throughput is kept.
fn rounds(smoke: bool) -> usize {
    if smoke {
        1
    } else {
        3
    }
}

/// The run with the median `throughput`, and the spread (max / min) across all runs.
fn median_run<T>(mut runs: Vec<T>, throughput: impl Fn(&T) -> f64) -> Result<(T, f64)> {
    runs.sort_by(|a, b| throughput(a).total_cmp(&throughput(b)));
    let spread = match (runs.first(), runs.last()) {
        (Some(lo), Some(hi)) if throughput(lo) > 0.0 => throughput(hi) / throughput(lo),
        _ => 1.0,
    };
    let mid = runs.len() / 2;
    let run = runs
        .into_iter()
        .nth(mid)
        .context("no benchmark round ran")?;
    Ok((run, spread))
}

/// Where benchmark files go: on the real disk (often not `/tmp`, which may be tmpfs).
pub fn scratch_dir() -> Result<tempfile::TempDir> {
    let base = std::env::var_os("METASTORE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-scratch"));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch dir in {}", base.display()))
}

/// How the writers of a WAL benchmark reach the disk.
#[derive(Clone, Copy)]
enum WalMode {
    /// OS threads calling the blocking `Wal::sync_to`; one of them leads each fsync.
    GroupCommitThreads,
    /// Tokio tasks awaiting `Committer::sync`; the committer's thread runs the fsyncs.
    GroupCommitTasks,
    /// OS threads taking turns, one fsync each: the baseline group commit is measured against.
    FsyncPerAppend,
}

impl WalMode {
    fn name(self) -> &'static str {
        match self {
            WalMode::GroupCommitThreads => "group-commit",
            WalMode::GroupCommitTasks => "group-commit-tasks",
            WalMode::FsyncPerAppend => "fsync-per-append",
        }
    }
}

fn wal_run(
    dir: &Path,
    writers: usize,
    duration: Duration,
    mode: WalMode,
) -> Result<(f64, f64, f64, f64)> {
    let (wal, _) = Wal::open(dir, WalOptions::default()).map_err(|e| anyhow!("{e}"))?;
    let wal = Arc::new(wal);
    let stop = Arc::new(AtomicBool::new(false));
    let index = Arc::new(AtomicU64::new(1));
    let fsyncs_before = wal.stats().fsyncs;
    let started = Instant::now();
    let lat = match mode {
        WalMode::GroupCommitTasks => {
            wal_tasks(wal.clone(), writers, duration, stop.clone(), index.clone())?
        }
        WalMode::GroupCommitThreads | WalMode::FsyncPerAppend => {
            let serial = Arc::new(Mutex::new(()));
            let group_commit = matches!(mode, WalMode::GroupCommitThreads);
            let mut threads = Vec::new();
            for _ in 0..writers {
                let (wal, serial, stop, index) =
                    (wal.clone(), serial.clone(), stop.clone(), index.clone());
                threads.push(std::thread::spawn(move || -> Result<Vec<Duration>> {
                    let payload = vec![b'w'; 300];
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if group_commit {
                            let i = index.fetch_add(1, Ordering::Relaxed);
                            let lsn = wal
                                .append(&[(1, i, &payload)])
                                .map_err(|e| anyhow!("{e}"))?;
                            wal.sync_to(lsn).map_err(|e| anyhow!("{e}"))?;
                        } else {
                            // One fsync per append: nobody shares a sync.
                            let _one_at_a_time = serial.lock().map_err(|_| anyhow!("poisoned"))?;
                            let i = index.fetch_add(1, Ordering::Relaxed);
                            wal.append_sync(1, i, &payload)
                                .map_err(|e| anyhow!("{e}"))?;
                        }
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                }));
            }
            std::thread::sleep(duration);
            stop.store(true, Ordering::Relaxed);
            let mut lat = Vec::new();
            for t in threads {
                lat.extend(t.join().map_err(|_| anyhow!("writer panicked"))??);
            }
            lat
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let fsyncs = (wal.stats().fsyncs - fsyncs_before) as f64 / elapsed;
    let appends = lat.len() as f64 / elapsed;
    let (p50, p99) = percentiles(lat);
    Ok((appends, fsyncs, p50, p99))
}

/// `writers` tokio tasks on a runtime with one worker per core, each appending one record and
/// awaiting its commit in a loop.
fn wal_tasks(
    wal: Arc<Wal>,
    writers: usize,
    duration: Duration,
    stop: Arc<AtomicBool>,
    index: Arc<AtomicU64>,
) -> Result<Vec<Duration>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_time()
        .build()
        .context("starting a tokio runtime")?;
    let committer = Arc::new(Committer::new(wal).map_err(|e| anyhow!("{e}"))?);
    let lat = runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let (committer, stop, index) = (committer.clone(), stop.clone(), index.clone());
            tasks.push(tokio::spawn(async move {
                let payload = vec![b'w'; 300];
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let i = index.fetch_add(1, Ordering::Relaxed);
                    committer
                        .append(&[(1, i, &payload)])
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            }));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for task in tasks {
            lat.extend(task.await.context("writer task panicked")??);
        }
        anyhow::Ok(lat)
    })?;
    Ok(lat)
}

pub fn wal(rec: &mut Recorder, smoke: bool) -> Result<()> {
    let duration = Duration::from_millis(if smoke { 200 } else { 3000 });
    for writers in [1usize, 16, 256] {
        for mode in [
            WalMode::GroupCommitThreads,
            WalMode::GroupCommitTasks,
            WalMode::FsyncPerAppend,
        ] {
            let mut runs = Vec::new();
            for _ in 0..rounds(smoke) {
                let dir = scratch_dir()?;
                runs.push(wal_run(dir.path(), writers, duration, mode)?);
            }
            let ((appends, fsyncs, p50, p99), spread) = median_run(runs, |r| r.0)?;
            let mode = mode.name();
            println!(
                "wal {mode} writers={writers}: {appends:.0} appends/s, {fsyncs:.0} fsyncs/s, p50 {:.1} µs, p99 {:.1} µs (median of {}, spread ×{spread:.2})",
                p50 * 1000.0,
                p99 * 1000.0,
                rounds(smoke)
            );
            rec.add(
                "wal",
                &format!("{mode}-w{writers}"),
                &[
                    ("appends_per_sec", appends),
                    ("n_fsyncs_per_sec", fsyncs),
                    ("p50_us", p50 * 1000.0),
                    ("p99_us", p99 * 1000.0),
                    ("n_spread", spread),
                ],
            );
        }
    }
    Ok(())
}

/// Decodes each committed batch and completes its requests: raft's path without an engine.
struct CountingMachine {
    completer: Arc<OnceLock<Completer<()>>>,
    applied: u64,
}

impl StateMachine for CountingMachine {
    fn apply(
        &mut self,
        entries: Vec<CommittedEntry>,
    ) -> Result<(), metastore_raft::StateMachineError> {
        for entry in entries {
            self.applied = entry.index;
            let batch = decode_batch(&entry.data).map_err(|e| e.to_string())?;
            if let Some(c) = self.completer.get() {
                c.complete(batch.id, vec![(); batch.commands.len()]);
            }
        }
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        self.applied
    }
}

struct RaftSink(RaftNode);

impl ProposalSink for RaftSink {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        let node = self.0.clone();
        Box::pin(async move {
            node.propose(frame)
                .await
                .map_err(|e| Arc::new(e) as ProposalRefused)
        })
    }
}

/// One member on a fresh WAL, driven by `producers` tasks for `duration`.
async fn raft_round(producers: usize, duration: Duration) -> Result<ProposerRun> {
    let dir = scratch_dir()?;
    let completer = Arc::new(OnceLock::new());
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path().join("wal"),
        RaftConfig::default(),
        Arc::new(NoPeers),
        Box::new(CountingMachine {
            completer: completer.clone(),
            applied: 0,
        }),
    )
    .map_err(|e| anyhow!("{e}"))?;
    // A single member campaigns at once; wait until it leads.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.status().is_leader {
        if Instant::now() > deadline {
            anyhow::bail!("the raft member did not become leader");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let proposer = Arc::new(BatchProposer::start(
        BatchConfig::default(),
        Arc::new(RaftSink(node.clone())),
    ));
    let _ = completer.set(proposer.completer());
    let run = drive_proposer(proposer, producers, duration, 256).await;
    node.shutdown();
    run
}

pub async fn raft(rec: &mut Recorder, smoke: bool) -> Result<()> {
    let duration = Duration::from_millis(if smoke { 300 } else { 3000 });
    for producers in [1usize, 256] {
        let mut runs = Vec::new();
        for _ in 0..rounds(smoke) {
            runs.push(raft_round(producers, duration).await?);
        }
        let (run, spread) = median_run(runs, |r| r.ops_per_sec)?;
        println!(
            "raft propose→apply producers={producers}: {:.0} commands/s, p50 {:.1} µs p99 {:.1} µs, {:.1} commands per entry (WAL fsync on; median of {}, spread ×{spread:.2})",
            run.ops_per_sec, run.p50_us, run.p99_us, run.commands_per_batch, rounds(smoke)
        );
        rec.add(
            "raft",
            &format!("propose-apply-p{producers}"),
            &[
                ("ops_per_sec", run.ops_per_sec),
                ("p50_us", run.p50_us),
                ("p99_us", run.p99_us),
                ("n_commands_per_entry", run.commands_per_batch),
                ("n_spread", spread),
            ],
        );
    }
    Ok(())
}
