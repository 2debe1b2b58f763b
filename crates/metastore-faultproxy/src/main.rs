//! `metastore-faultproxy --listen ADDR --upstream ADDR --control ADDR`
//!
//! Prints one line `listen=.. upstream=.. control=..` with the bound addresses once it is
//! ready (so callers may pass port 0), then serves the control protocol until killed.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{ensure, Context};
use clap::Parser;
use metastore_faultproxy::{control, FaultProxy};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(version, about = "Fault-injecting TCP proxy for robustness tests")]
struct Args {
    /// Address to accept proxied connections on (port 0 picks one).
    #[arg(long)]
    listen: SocketAddr,
    /// The only address the proxy dials.
    #[arg(long)]
    upstream: SocketAddr,
    /// Loopback address for the line-based control protocol (port 0 picks one).
    #[arg(long)]
    control: SocketAddr,
}

// One thread is plenty for test traffic and leaves the cores to the cluster under test.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.control.ip().is_loopback(),
        "--control must be a loopback address: the control protocol has no authentication"
    );
    let proxy = FaultProxy::start(args.listen, args.upstream)?;
    let control_listener = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("cannot listen on {}", args.control))?;
    let control_addr = control_listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "listen={} upstream={} control={control_addr}",
        proxy.local_addr(),
        proxy.upstream()
    )?;
    out.flush()?;
    drop(out);

    tokio::select! {
        res = control::serve(control_listener, proxy.control()) => res.context("control listener failed")?,
        res = tokio::signal::ctrl_c() => res.context("waiting for ctrl-c")?,
    }
    Ok(())
}
