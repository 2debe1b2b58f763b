//! Project tasks: `cargo xtask <task>`.
//!
//! - `loadgen put`: drives a running server (or etcd) with concurrent puts through the
//!   `etcd-client` crate and reports throughput and latency percentiles.

mod bench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use etcd_client::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Load generator against a running etcd-compatible endpoint.
    Loadgen {
        #[command(subcommand)]
        workload: Workload,
    },
    /// Benchmarks: in-process layers and whole-server measurements.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

#[derive(Subcommand)]
enum Workload {
    /// Concurrent puts of random keys from a key space.
    Put(LoadArgs),
    /// Many watchers on distinct keys over several streams; one client puts to random watched
    /// keys and the time from put to event is measured.
    WatchLatency(WatchArgs),
    /// Many leases with the same TTL expire together while one client keeps putting: measures
    /// put latency across the expiry and how long until every lease key is gone.
    LeaseExpiry(LeaseArgs),
}

#[derive(Parser, Clone)]
struct WatchArgs {
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(long, default_value_t = 100_000)]
    watchers: usize,
    /// Watch streams the watchers are spread over (one gRPC connection each).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Puts measured.
    #[arg(long, default_value_t = 2_000)]
    puts: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
struct LeaseArgs {
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// TTL of every lease, seconds.
    #[arg(long, default_value_t = 5)]
    ttl: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
struct LoadArgs {
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Concurrent clients (each sends one request at a time).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    #[arg(long, default_value_t = 100_000)]
    key_space_size: u64,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.task {
        Task::Bench { bench } => bench::run(bench, &rt),
        Task::Loadgen { workload } => match workload {
            Workload::Put(args) => rt.block_on(put(args)),
            Workload::WatchLatency(args) => rt.block_on(watch_latency(args)),
            Workload::LeaseExpiry(args) => rt.block_on(lease_expiry(args)),
        },
    }
}

/// Percentile of sorted samples, in milliseconds.
fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn connect(endpoints: &str) -> Result<Client> {
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    Client::connect(&endpoints, None)
        .await
        .with_context(|| format!("connecting to {endpoints:?}"))
}

async fn watch_latency(args: WatchArgs) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    if args.streams == 0 || args.watchers < args.streams {
        bail!("need at least one watcher per stream");
    }
    let key = |i: usize| format!("wl/{i:08}").into_bytes();
    let sent: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let created = Arc::new(AtomicU64::new(0));
    let setup = Instant::now();
    let per_stream = args.watchers / args.streams;
    let mut readers = Vec::new();
    for s in 0..args.streams {
        let mut client = connect(&args.endpoints).await?;
        let first = s * per_stream;
        let last = if s + 1 == args.streams {
            args.watchers
        } else {
            first + per_stream
        };
        let mut stream = client.watch(key(first), None).await?;
        for i in first + 1..last {
            stream.watch(key(i), None).await?;
        }
        let (sender, mut responses) = stream.split();
        let (sent, lat_tx, created) = (sent.clone(), lat_tx.clone(), created.clone());
        readers.push(tokio::spawn(async move {
            let _keep_open = (sender, client);
            while let Ok(Some(resp)) = responses.message().await {
                if resp.created() {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let start = sent.lock().ok().and_then(|mut m| m.remove(kv.key()));
                    if let Some(start) = start {
                        let _ = lat_tx.send(start.elapsed());
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while created.load(Ordering::Relaxed) < args.watchers as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} watchers created",
                created.load(Ordering::Relaxed),
                args.watchers
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let setup = setup.elapsed();
    let mut kv = connect(&args.endpoints).await?.kv_client();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut lat = Vec::with_capacity(args.puts);
    let mut missing = 0usize;
    for _ in 0..args.puts {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let k = key(seed as usize % args.watchers);
        if let Ok(mut m) = sent.lock() {
            m.insert(k.clone(), Instant::now());
        }
        kv.put(k, b"v".to_vec(), None).await?;
        // One put at a time: the event's latency is not hidden behind a queue of puts.
        match tokio::time::timeout(Duration::from_secs(5), lat_rx.recv()).await {
            Ok(Some(d)) => lat.push(d),
            _ => missing += 1,
        }
    }
    for r in readers {
        r.abort();
    }
    lat.sort_unstable();
    let (p50, p90, p99, max) = (
        pct_ms(&lat, 0.5),
        pct_ms(&lat, 0.9),
        pct_ms(&lat, 0.99),
        pct_ms(&lat, 1.0),
    );
    if args.json {
        println!(
            "{{\"workload\":\"watch-latency\",\"watchers\":{},\"streams\":{},\"setup_s\":{:.2},\"events\":{},\"missing\":{},\"p50_ms\":{p50:.3},\"p90_ms\":{p90:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3}}}",
            args.watchers, args.streams, setup.as_secs_f64(), lat.len(), missing
        );
    } else {
        println!(
            "watch-latency watchers={} streams={} (created in {:.2}s): {} events, {} missing; put->event p50 {p50:.3} ms  p90 {p90:.3} ms  p99 {p99:.3} ms  max {max:.3} ms",
            args.watchers, args.streams, setup.as_secs_f64(), lat.len(), missing
        );
    }
    if missing > 0 {
        bail!("{missing} events never arrived");
    }
    Ok(())
}

async fn lease_expiry(args: LeaseArgs) -> Result<()> {
    let mut client = connect(&args.endpoints).await?;
    let granted = Instant::now();
    let mut tasks = Vec::new();
    let per_task = args.leases.div_ceil(16);
    for t in 0..16 {
        let mut c = client.clone();
        let (lo, hi) = (t * per_task, ((t + 1) * per_task).min(args.leases));
        let ttl = args.ttl;
        tasks.push(tokio::spawn(async move {
            for i in lo..hi {
                let lease = c.lease_grant(ttl, None).await?.id();
                c.put(
                    format!("le/{i:08}"),
                    "v",
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await?;
            }
            Ok::<_, etcd_client::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let setup = granted.elapsed();
    // Keep writing while they expire; note every put's latency and when the last key goes.
    let mut lat = Vec::new();
    let mut gone_after = None;
    let until = granted + Duration::from_secs(args.ttl as u64 * 3 + 10);
    let mut i = 0u64;
    let mut last_check = Instant::now();
    while Instant::now() < until {
        let t = Instant::now();
        client.put(format!("other/{}", i % 1000), "x", None).await?;
        lat.push(t.elapsed());
        i += 1;
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            let left = client
                .get(
                    "le/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await?
                .count();
            if left == 0 {
                gone_after = Some(granted.elapsed());
                break;
            }
        }
    }
    lat.sort_unstable();
    let Some(gone) = gone_after else {
        bail!(
            "lease keys still present {:?} after the grants",
            until - granted
        );
    };
    let (p50, p99, max) = (pct_ms(&lat, 0.5), pct_ms(&lat, 0.99), pct_ms(&lat, 1.0));
    if args.json {
        println!(
            "{{\"workload\":\"lease-expiry\",\"leases\":{},\"ttl_s\":{},\"grant_s\":{:.2},\"all_gone_after_s\":{:.2},\"puts\":{},\"put_p50_ms\":{p50:.3},\"put_p99_ms\":{p99:.3},\"put_max_ms\":{max:.3}}}",
            args.leases, args.ttl, setup.as_secs_f64(), gone.as_secs_f64(), lat.len()
        );
    } else {
        println!(
            "lease-expiry leases={} ttl={}s: granted in {:.2}s, all keys gone {:.2}s after the first grant; {} puts meanwhile: p50 {p50:.3} ms  p99 {p99:.3} ms  max {max:.3} ms",
            args.leases, args.ttl, setup.as_secs_f64(), gone.as_secs_f64(), lat.len()
        );
    }
    Ok(())
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0width$}", width = size);
    s.into_bytes()
}

async fn put(args: LoadArgs) -> Result<()> {
    if args.clients == 0 || args.conns == 0 {
        bail!("--clients and --conns must be positive");
    }
    let endpoints: Vec<String> = args.endpoints.split(',').map(str::to_string).collect();
    let mut conns = Vec::new();
    for _ in 0..args.conns {
        conns.push(
            Client::connect(&endpoints, None)
                .await
                .with_context(|| format!("connecting to {}", args.endpoints))?,
        );
    }
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let value = vec![b'v'; args.val_size];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut kv = conns[c % conns.len()].kv_client();
        let issued = issued.clone();
        let errors = errors.clone();
        let value = value.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
            loop {
                if issued.fetch_add(1, Ordering::Relaxed) >= args.total {
                    break;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let k = key(seed % args.key_space_size, args.key_size);
                let t = Instant::now();
                match kv.put(k, value.clone(), None).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    let ok = lat.len() as f64;
    let rate = ok / elapsed.as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if args.json {
        println!(
            "{{\"workload\":\"put\",\"clients\":{},\"conns\":{},\"ok\":{},\"errors\":{},\"seconds\":{:.3},\"ops_per_sec\":{:.0},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
            args.clients, args.conns, lat.len(), errors, elapsed.as_secs_f64(), rate,
            pct(0.5), pct(0.9), pct(0.99), pct(0.999), pct(1.0)
        );
    } else {
        println!(
            "put clients={} conns={} ok={} errors={} in {:.2}s: {:.0} ops/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            args.clients, args.conns, lat.len(), errors, elapsed.as_secs_f64(), rate,
            pct(0.5), pct(0.9), pct(0.99), pct(0.999), pct(1.0)
        );
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
