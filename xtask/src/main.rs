//! Project tasks: `cargo xtask <task>`.
//!
//! - `bench <layer>`: in-process layer benchmarks (codec, batch, wal, raft, engine), whole-server
//!   runs (e2e, restart), `compare` against the baseline, and `smoke` (everything, in seconds).
//! - `loadgen lease-expiry`: leases expiring together under load. The etcd benchmark workloads
//!   are `metastore-bench` (`cargo run --release -p metastore-bench -- --help`).

mod bench;
mod cluster;
mod e2e;
mod k8s;
mod large;
mod layers;
mod loadgen;
mod results;
mod scale;
mod secure;
mod server;
mod targets;

use anyhow::Result;

// The in-process layer benches run the server's crates, so they run them on the server's
// allocator: under glibc's malloc the engine bench spent ~45 % of its time in malloc/free
// (perf), measuring the allocator rather than the engine.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmarks: in-process layers and whole-server measurements.
    Bench(bench::BenchCmd),
    /// Load generators not covered by `metastore-bench`.
    Loadgen {
        #[command(subcommand)]
        workload: Workload,
    },
}

#[derive(Subcommand)]
enum Workload {
    /// Many leases with the same TTL expire together while one client keeps putting: measures
    /// put latency across the expiry and how long until every lease key is gone.
    LeaseExpiry(loadgen::LeaseArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.task {
        Task::Bench(cmd) => bench::run(cmd, &rt),
        Task::Loadgen { workload } => match workload {
            Workload::LeaseExpiry(args) => rt.block_on(loadgen::lease_expiry(args)),
        },
    }
}
