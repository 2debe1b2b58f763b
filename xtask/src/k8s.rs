//! `cargo xtask bench k8s`: the Kubernetes-shaped workload (`metastore-bench k8s`) against
//! fresh servers taking turns — MetaStore on the memory engine, on RocksDB and, with
//! `--vs-etcd`, etcd. Each is loaded with the same objects, then runs the same mix of guarded
//! updates, creates, deletes and quorum gets with the same paced lists, watches and
//! compactions; the round with the median update rate is kept per server.

use crate::e2e::metrics_of;
use crate::results::Recorder;
use crate::scale::Target;
use crate::server::{free_port, wait_for_quiet_machine, wait_ready, Probe};
use anyhow::{bail, Result};
use clap::Parser;
use metastore_bench::report::Report;
use metastore_bench::{Common, K8sArgs, Workload};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Clone)]
pub struct K8sBenchArgs {
    /// Seconds of mixed load after the objects are created.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Closed-loop clients (each owns its share of the objects).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Rounds per server; the round with the median update rate is kept.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Directory holding release `metastore` (default: `cargo build --release` first).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "etcd")]
    etcd_bin: String,
    /// Also run etcd (its backend quota raised to 8 GiB).
    #[arg(long)]
    vs_etcd: bool,
    /// Skip MetaStore on RocksDB.
    #[arg(long)]
    no_rocksdb: bool,
    /// The workload's own flags (objects, sizes, mix, list rate, compaction interval).
    #[command(flatten)]
    workload: K8sArgs,
}

/// Parses the workload's flags from a fixed list (its defaults are clap's).
#[derive(Parser)]
struct WorkloadOnly {
    #[command(flatten)]
    workload: K8sArgs,
}

impl K8sBenchArgs {
    /// 2,000 objects and one second of load, with lists and compactions often enough that
    /// several happen: keeps the case from rotting in CI.
    pub fn smoke(bin_dir: Option<PathBuf>) -> Self {
        let flags = [
            "k8s",
            "--objects",
            "2000",
            "--list-rate",
            "5",
            "--compact-every",
            "200ms",
        ];
        Self {
            duration: 1.0,
            clients: 8,
            conns: 2,
            rounds: 1,
            bin_dir,
            etcd_bin: "etcd".into(),
            vs_etcd: false,
            no_rocksdb: false,
            workload: WorkloadOnly::parse_from(flags).workload,
        }
    }
}

async fn one_run(target: Target, bin_dir: &Path, args: &K8sBenchArgs) -> Result<Report> {
    let dir = crate::layers::scratch_dir()?;
    let ports = (free_port()?, free_port()?);
    let server = target.start(bin_dir, &args.etcd_bin, dir.path(), ports)?;
    wait_ready(ports.0, Probe::StatusAndPut, Duration::from_secs(30)).await?;
    wait_for_quiet_machine(0.2, Duration::from_secs(30)).await;
    let common = Common {
        endpoints: format!("127.0.0.1:{}", ports.0),
        clients: args.clients,
        conns: args.conns,
        duration: Some(Duration::from_secs_f64(args.duration)),
        server_pid: Some(server.child.id()),
        no_progress: true,
        ..Common::default()
    };
    let report = metastore_bench::run(&Workload::K8s(args.workload.clone()), &common).await?;
    server.kill()?;
    if target != Target::Etcd && (report.error_count() > 0 || report.checks.failed > 0) {
        bail!(
            "k8s on {}: errors {:?}, checks {:?}",
            target.name(),
            report.errors,
            report.checks
        );
    }
    Ok(report)
}

fn extra(r: &Report, name: &str) -> f64 {
    r.extra.get(name).copied().unwrap_or(f64::NAN)
}

pub async fn run(args: K8sBenchArgs, rec: &mut Recorder) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::e2e::build_binaries()?,
    };
    let targets = Target::chosen(!args.no_rocksdb, args.vs_etcd);
    let mut runs: Vec<Vec<Report>> = vec![Vec::new(); targets.len()];
    for _ in 0..args.rounds.max(1) {
        for (i, &target) in targets.iter().enumerate() {
            runs[i].push(one_run(target, &bin_dir, &args).await?);
        }
    }
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
        "k8s",
        "load o/s",
        "update/s",
        "upd p99",
        "get p99",
        "list p99",
        "watch p99",
        "cpu µs/op",
        "errors"
    );
    for (target, mut reports) in targets.into_iter().zip(runs) {
        reports.sort_by(|a, b| extra(a, "update_per_sec").total_cmp(&extra(b, "update_per_sec")));
        let r = reports.swap_remove(reports.len() / 2);
        println!(
            "{:<20} {:>9.0} {:>9.0} {:>7.2}ms {:>7.2}ms {:>7.1}ms {:>7.2}ms {:>10.1} {:>8}",
            target.name(),
            extra(&r, "load_objects_per_sec"),
            extra(&r, "update_per_sec"),
            extra(&r, "update_p99_ms"),
            extra(&r, "get_p99_ms"),
            extra(&r, "list_p99_ms"),
            extra(&r, "watch_delay_p99_ms"),
            r.server_cpu_us_per_op.unwrap_or(f64::NAN),
            r.error_count()
        );
        let mut metrics: Vec<(String, f64)> = metrics_of(&r)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        metrics.extend(r.extra.iter().map(|(k, v)| (k.clone(), *v)));
        let metrics: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        rec.add("k8s", &format!("k8s/{}", target.name()), &metrics);
    }
    Ok(())
}
