//! `cargo xtask loadgen lease-expiry`: many leases expiring together under a put load.
//! (The request/response and watch workloads live in `metastore-bench`.)

use anyhow::{bail, Context, Result};
use clap::Parser;
use etcd_client::Client;
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
pub struct LeaseArgs {
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

pub async fn lease_expiry(args: LeaseArgs) -> Result<()> {
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
            let left = crate::server::count_prefix(&mut client, "le/").await?;
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
