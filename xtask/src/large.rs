//! `cargo xtask bench large`: puts of large values, 64 KiB and 1 MiB (the sizes of big
//! Kubernetes objects and of values near etcd's 1.5 MiB request limit), against MetaStore
//! (memory engine) and, with `--vs-etcd`, etcd. Each server is fresh for each run, the
//! servers take turns within a round, and the round with the median throughput is kept.

use crate::e2e::metrics_of;
use crate::results::Recorder;
use crate::secure::{certs, prepare, spawn, Mode, Who};
use crate::server::{free_port, Server};
use anyhow::{bail, Result};
use metastore_bench::report::Report;
use metastore_bench::{Common, Workload};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The same as `bench secure`'s: duration, rounds, binaries, `--vs-etcd`, smoke.
pub use crate::secure::SecureArgs as LargeArgs;

/// A load: value size, clients, connections, keys overwritten.
struct Case {
    name: &'static str,
    val_size: usize,
    clients: usize,
    conns: usize,
    keys: u64,
}

const CASES: [Case; 2] = [
    Case {
        name: "put-64k-c32",
        val_size: 64 * 1024,
        clients: 32,
        conns: 8,
        keys: 1_000,
    },
    Case {
        name: "put-1m-c8",
        val_size: 1024 * 1024,
        clients: 8,
        conns: 4,
        keys: 100,
    },
];

fn label(case: &Case, who: Who) -> String {
    let w = match who {
        Who::MetaStore => "metastore",
        Who::Etcd => "etcd",
    };
    format!("{}/{w}", case.name)
}

async fn one_run(case: &Case, who: Who, bin: &Path, args: &LargeArgs) -> Result<Report> {
    let dir = crate::layers::scratch_dir()?;
    let certs = certs(dir.path())?;
    let port = free_port()?;
    let child = spawn(who, Mode::Plain, bin, dir.path(), port, &certs)?;
    let pid = child.id();
    let server = Server::new(child, port, Some(dir));
    let base = Common {
        endpoints: format!("127.0.0.1:{port}"),
        server_pid: Some(pid),
        no_progress: true,
        ..Common::default()
    };
    let common = prepare(Mode::Plain, &base).await?;
    let (clients, conns) = if args.smoke {
        (2, 1)
    } else {
        (case.clients, case.conns)
    };
    let load = Common {
        clients,
        conns,
        val_size: case.val_size,
        key_size: 16,
        key_space_size: case.keys,
        duration: Some(Duration::from_secs_f64(args.duration)),
        ..common
    };
    let report = metastore_bench::run(&Workload::Put, &load).await?;
    server.kill()?;
    if who == Who::MetaStore && (report.error_count() > 0 || report.checks.failed > 0) {
        bail!("{}: errors {:?}", label(case, who), report.errors);
    }
    Ok(report)
}

pub async fn run(args: LargeArgs, rec: &mut Recorder) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::e2e::build_binaries()?,
    };
    let who: &[Who] = if args.vs_etcd {
        &[Who::MetaStore, Who::Etcd]
    } else {
        &[Who::MetaStore]
    };
    let rounds = if args.smoke { 1 } else { args.rounds.max(1) };
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>14}",
        "case", "ops/s", "MiB/s", "p99 ms", "server µs/op"
    );
    for case in &CASES {
        let mut reports: Vec<Vec<Report>> = vec![Vec::new(); who.len()];
        for round in 0..rounds {
            for (i, w) in who.iter().enumerate() {
                let bin = match w {
                    Who::MetaStore => bin_dir.join("metastore"),
                    Who::Etcd => PathBuf::from(&args.etcd_bin),
                };
                let r = one_run(case, *w, &bin, &args).await?;
                eprintln!(
                    "round {round}: {:<24} {:>9.0} ops/s  p99 {:>8.2} ms",
                    label(case, *w),
                    r.ops_per_sec,
                    r.latency_ms.p99
                );
                reports[i].push(r);
            }
        }
        for (w, mut runs) in who.iter().zip(reports) {
            runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
            let median = runs.swap_remove(runs.len() / 2);
            println!(
                "{:<24} {:>9.0} {:>9.1} {:>9.2} {:>14.1}",
                label(case, *w),
                median.ops_per_sec,
                median.ops_per_sec * case.val_size as f64 / (1024.0 * 1024.0),
                median.latency_ms.p99,
                median.server_cpu_us_per_op.unwrap_or(f64::NAN)
            );
            rec.add("large", &label(case, *w), &metrics_of(&median));
        }
    }
    Ok(())
}
