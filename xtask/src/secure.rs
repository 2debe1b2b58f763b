//! `cargo xtask bench secure`: what auth and TLS cost. Put at 256 clients (16 connections)
//! against MetaStore (memory engine) and etcd, each plain, with auth on (simple tokens, a user
//! whose role grants the whole key space, so every request walks the permission check), and
//! over TLS. Each server is fresh for each run, the six take turns within a round, and the
//! round with the median throughput is kept.

use crate::e2e::metrics_of;
use crate::results::Recorder;
use crate::server::{free_port, Server};
use anyhow::{bail, Context, Result};
use clap::Parser;
use metastore_bench::report::Report;
use metastore_bench::{Common, Workload};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Servers taking turns: the arguments of `bench secure` and `bench large`.
#[derive(Parser, Clone)]
pub struct SecureArgs {
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Directory holding release `metastore` (default: `cargo build --release` first).
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "etcd")]
    pub(crate) etcd_bin: String,
    /// Also run etcd with the same settings and loads (the comparison the issues ask for).
    #[arg(long)]
    pub(crate) vs_etcd: bool,
    /// Cut down to seconds (CI).
    #[arg(long)]
    pub(crate) smoke: bool,
}

impl SecureArgs {
    /// MetaStore alone for a fraction of a second per case: keeps the harness from rotting
    /// in CI.
    pub fn smoke(bin_dir: Option<PathBuf>) -> Self {
        Self {
            duration: 0.3,
            rounds: 1,
            bin_dir,
            etcd_bin: "etcd".into(),
            vs_etcd: false,
            smoke: true,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    Plain,
    Auth,
    Tls,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Who {
    MetaStore,
    Etcd,
}

fn label(who: Who, mode: Mode) -> String {
    let w = match who {
        Who::MetaStore => "metastore",
        Who::Etcd => "etcd",
    };
    let m = match mode {
        Mode::Plain => "plain",
        Mode::Auth => "auth",
        Mode::Tls => "tls",
    };
    format!("put-c256/{w}-{m}")
}

/// A CA and a server certificate for 127.0.0.1, written as PEM files under `dir`.
pub(crate) struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

pub(crate) fn certs(dir: &Path) -> Result<Certs> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name.push(DnType::CommonName, "server");
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let write = |name: &str, text: String| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(Certs {
        ca: write("ca.pem", ca_cert.pem())?,
        cert: write("server.pem", leaf_cert.pem())?,
        key: write("server-key.pem", leaf_key.serialize_pem())?,
    })
}

pub(crate) fn spawn(
    who: Who,
    mode: Mode,
    bin: &Path,
    dir: &Path,
    port: u16,
    c: &Certs,
) -> Result<Child> {
    command(who, mode, bin, dir, (port, free_port()?), c)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// The command line of one single-member server with its data under `dir/data`, serving
/// clients on `ports.0` and peers on `ports.1` (fixed, so a restart finds the member where
/// its data says it is).
pub(crate) fn command(
    who: Who,
    mode: Mode,
    bin: &Path,
    dir: &Path,
    ports: (u16, u16),
    c: &Certs,
) -> Command {
    let (port, peer) = ports;
    let peer = format!("http://127.0.0.1:{peer}");
    let scheme = if mode == Mode::Tls { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}");
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "bench", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("bench={peer}")])
        .args(["--quota-backend-bytes", "8589934592"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if mode == Mode::Tls {
        cmd.arg("--cert-file").arg(&c.cert);
        cmd.arg("--key-file").arg(&c.key);
    }
    match who {
        Who::MetaStore => cmd.args(["--log-level", "warn"]),
        Who::Etcd => cmd.args(["--logger", "zap", "--log-level", "error"]),
    };
    cmd
}

/// Waits until a put goes through the way the load will send it, setting auth up first.
pub(crate) async fn prepare(mode: Mode, base: &Common) -> Result<Common> {
    let started = Instant::now();
    let admin = Common {
        user: None,
        ..base.clone()
    };
    loop {
        let ready = async {
            let mut c = metastore_bench::connect_client(&admin).await?;
            c.put("ready", "x", None).await?;
            anyhow::Ok(c)
        };
        match ready.await {
            Ok(mut c) => {
                if mode == Mode::Auth {
                    c.user_add("root", "rootpw", None).await?;
                    c.role_add("root").await?;
                    c.user_grant_role("root", "root").await?;
                    c.user_add("bench", "benchpw", None).await?;
                    c.role_add("bench").await?;
                    // Every key from "\0" on: a real permission check, not root's shortcut.
                    let everything = etcd_client::Permission::read_write(vec![0u8]).with_from_key();
                    c.role_grant_permission("bench", everything).await?;
                    c.user_grant_role("bench", "bench").await?;
                    c.auth_enable().await?;
                    return Ok(Common {
                        user: Some("bench:benchpw".into()),
                        ..base.clone()
                    });
                }
                return Ok(base.clone());
            }
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                bail!("server not ready after 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn one_run(
    who: Who,
    mode: Mode,
    bin: &Path,
    certs: &Certs,
    args: &SecureArgs,
) -> Result<Report> {
    let dir = crate::layers::scratch_dir()?;
    let port = free_port()?;
    let child = spawn(who, mode, bin, dir.path(), port, certs)?;
    let pid = child.id();
    let server = Server::new(child, port, Some(dir));
    let base = Common {
        endpoints: format!("127.0.0.1:{port}"),
        server_pid: Some(pid),
        no_progress: true,
        cacert: (mode == Mode::Tls).then(|| certs.ca.clone()),
        ..Common::default()
    };
    let common = prepare(mode, &base).await?;
    let (clients, conns) = if args.smoke { (8, 2) } else { (256, 16) };
    let load = Common {
        clients,
        conns,
        duration: Some(Duration::from_secs_f64(args.duration)),
        ..common
    };
    let report = metastore_bench::run(&Workload::Put, &load).await?;
    server.kill()?;
    if who == Who::MetaStore && (report.error_count() > 0 || report.checks.failed > 0) {
        bail!("{}: errors {:?}", label(who, mode), report.errors);
    }
    Ok(report)
}

pub async fn run(args: SecureArgs, rec: &mut Recorder) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::e2e::build_binaries()?,
    };
    let scratch = crate::layers::scratch_dir()?;
    let certs = certs(scratch.path())?;
    let who: &[Who] = if args.vs_etcd {
        &[Who::MetaStore, Who::Etcd]
    } else {
        &[Who::MetaStore]
    };
    let targets: Vec<(Who, Mode)> = who
        .iter()
        .copied()
        .flat_map(|w| [Mode::Plain, Mode::Auth, Mode::Tls].map(|m| (w, m)))
        .collect();
    let rounds = if args.smoke { 1 } else { args.rounds.max(1) };
    let mut reports: Vec<Vec<Report>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, (who, mode)) in targets.iter().enumerate() {
            let bin = match who {
                Who::MetaStore => bin_dir.join("metastore"),
                Who::Etcd => PathBuf::from(&args.etcd_bin),
            };
            let r = one_run(*who, *mode, &bin, &certs, &args).await?;
            eprintln!(
                "round {round}: {:<26} {:>9.0} ops/s  p99 {:>7.2} ms",
                label(*who, *mode),
                r.ops_per_sec,
                r.latency_ms.p99
            );
            reports[i].push(r);
        }
    }
    println!(
        "{:<26} {:>10} {:>9} {:>12}",
        "case", "ops/s", "p99 ms", "server µs/op"
    );
    for ((who, mode), mut runs) in targets.into_iter().zip(reports) {
        runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
        let median = runs.swap_remove(runs.len() / 2);
        println!(
            "{:<26} {:>10.0} {:>9.2} {:>12.1}",
            label(who, mode),
            median.ops_per_sec,
            median.latency_ms.p99,
            median.server_cpu_us_per_op.unwrap_or(f64::NAN)
        );
        rec.add("secure", &label(who, mode), &metrics_of(&median));
    }
    Ok(())
}
