//! `metastore-bench`: etcd benchmark's workloads against MetaStore or any etcd endpoint.

use anyhow::Result;
use clap::{Parser, Subcommand};

use metastore_bench::{Common, Workload};
use std::net::SocketAddr;
use std::process::ExitCode;

// The server runs on mimalloc. The no-op servers this binary hosts are the ceiling the server is
// measured against, so they must not carry glibc's malloc (measured: ~0.6 µs more server CPU per
// put, a ceiling 3-4 % lower); and a lighter load generator leaves more CPU to every target.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let parsed = match parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metastore-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(parsed)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("metastore-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse() -> Result<Parsed, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    // Flags may come before or after the workload name, as with etcd's benchmark.
    let mut cmd = Top::command();
    let matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
    Top::from_arg_matches(&matches).map(|t| match t.command {
        TopCommand::NoopServer { listen, defer } => Parsed::Noop(listen, defer),
        TopCommand::Run(w) => Parsed::Run(w, Box::new(t.common)),
    })
}

enum Parsed {
    Noop(SocketAddr, bool),
    Run(Workload, Box<Common>),
}

#[derive(Parser)]
#[command(
    name = "metastore-bench",
    about = "Load generator with etcd benchmark's workloads, for MetaStore or any etcd endpoint"
)]
struct Top {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Subcommand)]
enum TopCommand {
    #[command(flatten)]
    Run(Workload),
    /// Serve a do-nothing etcd KV (Put/Range) to measure the gRPC ceiling of this machine.
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:23790")]
        listen: SocketAddr,
        /// Answer each Put from a separate thread, as a server that waits for a commit does:
        /// the cost of that hand-off alone, without any consensus or storage work.
        #[arg(long)]
        defer: bool,
    },
}

async fn run(parsed: Parsed) -> Result<ExitCode> {
    match parsed {
        Parsed::Noop(addr, defer) => {
            let answers = if defer { "deferred" } else { "at once" };
            eprintln!("noop etcd KV listening on {addr}, answering Puts {answers}");
            metastore_bench::noop::serve(addr, defer).await?;
            Ok(ExitCode::SUCCESS)
        }
        Parsed::Run(workload, common) => {
            let report = metastore_bench::run(&workload, &common).await?;
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.render());
            }
            if report.error_count() > 0 || report.checks.failed > 0 {
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
