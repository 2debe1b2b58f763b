//! Server processes under test: how benchmarks start the real binaries and wait for them.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server process; killed (and reaped) on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    /// Scratch data directory owned by this server, removed after it.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    pub fn new(child: Child, port: u16, dir: Option<tempfile::TempDir>) -> Self {
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// `kill -9`, and wait until the process is gone.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the kernel just handed out (free unless somebody takes it before the server does;
/// the server then exits with a bind error and `wait_ready` reports it).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the `metastore` binary on `data_dir`, serving clients on `port`, with a free peer
/// port (so a benchmark never collides with a member on the default 2380).
pub fn spawn_metastore(
    bin: &Path,
    data_dir: &Path,
    storage: &str,
    port: u16,
    extra_args: &[&str],
) -> Result<Child> {
    let peer = free_port()?;
    Command::new(bin)
        .args([
            "--data-dir",
            data_dir.to_str().context("non-UTF-8 data dir")?,
        ])
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--storage", storage, "--log-level", "warn"])
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// How to tell that a server serves.
#[derive(Clone, Copy)]
pub enum Probe {
    /// Maintenance.Status answers and a put succeeds (a real etcd-compatible server).
    StatusAndPut,
    /// Only a put (the no-op server has no Maintenance service).
    Put,
}

/// Polls until the server on `port` passes `probe`; returns how long that took.
pub async fn wait_ready(port: u16, probe: Probe, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([format!("127.0.0.1:{port}")], None).await {
            let ok = match probe {
                Probe::Put => c.put("ready", "x", None).await.is_ok(),
                Probe::StatusAndPut => {
                    c.status().await.is_ok() && c.put("ready", "x", None).await.is_ok()
                }
            };
            if ok {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "server on port {port} not ready after {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
