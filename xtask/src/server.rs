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

/// The resident memory of process `pid` in KiB (0 once it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// How many keys under `prefix` the server holds (a count-only range, no values sent).
pub async fn count_prefix(client: &mut etcd_client::Client, prefix: &str) -> Result<i64> {
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    Ok(client.get(prefix, Some(options)).await?.count())
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

/// Busy and total CPU time of the whole machine so far, in clock ticks (`/proc/stat`).
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied()? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Waits (up to `timeout`) until the machine is quiet: below `max_busy` of its CPU time busy
/// over a 200 ms window. Servers that are idle between their turns still finish background
/// work (RocksDB compactions, etcd's own snapshots) left by the previous case, and that work
/// landed in whichever server's latency was measured next. Returns how long it waited and
/// whether the machine got quiet; without `/proc/stat` it returns at once.
pub async fn wait_for_quiet_machine(max_busy: f64, timeout: Duration) -> (Duration, bool) {
    let started = Instant::now();
    let Some(mut last) = machine_cpu_ticks() else {
        return (Duration::ZERO, true);
    };
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(now) = machine_cpu_ticks() else {
            return (started.elapsed(), true);
        };
        let (busy, total) = (now.0 - last.0, now.1 - last.1);
        if total > 0 && (busy as f64) < max_busy * total as f64 {
            return (started.elapsed(), true);
        }
        if started.elapsed() >= timeout {
            return (started.elapsed(), false);
        }
        last = now;
    }
}
