//! Project tasks: `cargo xtask <task>`.
//!
//! - `loadgen put`: drives a running server (or etcd) with concurrent puts through the
//!   `etcd-client` crate and reports throughput and latency percentiles.

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
}

#[derive(Subcommand)]
enum Workload {
    /// Concurrent puts of random keys from a key space.
    Put(LoadArgs),
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
        Task::Loadgen {
            workload: Workload::Put(args),
        } => rt.block_on(put(args)),
    }
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
