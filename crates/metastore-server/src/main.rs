use clap::Parser;
use metastore_server::config::{Cli, Config, SnapshotCommand, Subcommand};
use metastore_server::{logging, version};
use std::process::ExitCode;

// glibc's malloc/free took ~10 % of the server's CPU under load (perf, 256 clients); mimalloc's
// thread-local free lists suit the many small short-lived buffers of gRPC and apply.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version || matches!(cli.command, Some(Subcommand::Version)) {
        print!("{}", version::version_text());
        return ExitCode::SUCCESS;
    }
    if let Some(Subcommand::Snapshot(SnapshotCommand::Status { file, write_out })) = &cli.command {
        return match metastore_server::tools::snapshot_status(file, write_out) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("Error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Subcommand::Snapshot(SnapshotCommand::Restore {
        file,
        skip_hash_check,
        bump_revision,
        mark_compacted,
        flags,
    })) = cli.command
    {
        let options = metastore_server::restore::RestoreOptions {
            skip_hash_check,
            bump_revision,
            mark_compacted,
        };
        return match metastore_server::restore::snapshot_restore(&file, *flags, options) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("Error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metastore: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(config.log_format, &config.log_outputs, &config.log_level) {
        eprintln!("metastore: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(
        version = version::VERSION,
        git_sha = version::GIT_SHA,
        rust_version = version::RUST_VERSION,
        os = std::env::consts::OS,
        arch = std::env::consts::ARCH,
        api_version = version::API_VERSION,
        "metastore version"
    );
    tracing::info!(name = %config.name, data_dir = %config.data_dir, storage = ?config.storage, "starting metastore");
    match metastore_server::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at SIGINT or SIGTERM. The handlers are installed here, at once, not at the future's
/// first poll: the server polls it only once it serves, and a SIGTERM that arrived before would
/// otherwise kill the process without a clean stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        #[cfg(unix)]
        {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
