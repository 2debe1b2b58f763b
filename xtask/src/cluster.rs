//! `cargo xtask bench e2e --cluster N [--vs-etcd]`: an N-member MetaStore cluster and, with
//! `--vs-etcd`, an N-member etcd with the same raft timing (100 ms heartbeat, 1 s election
//! timeout), one cluster at a time on this machine. Each runs writes through the leader and
//! through a follower and linearizable reads on a follower, then a rolling restart under a write
//! load (each member in turn: SIGTERM, restart on its data dir, wait until it serves), then
//! failover: the time from `kill -9` of the leader to the first write acknowledged by the
//! survivors.

use crate::results::Recorder;
use crate::server::{free_port, wait_for_quiet_machine, wait_ready, Probe, Server};
use anyhow::{bail, Context, Result};
use metastore_bench::report::Report;
use metastore_bench::{Common, Consistency, RangeArgs, Workload};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QUOTA_BYTES: &str = "8589934592";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    MetaStore,
    Etcd,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::MetaStore => "metastore",
            Kind::Etcd => "etcd",
        }
    }
}

/// A running cluster; members are killed (and their data removed) on drop.
struct Cluster {
    members: Vec<Option<Server>>,
    /// How each member was started, to start it again on its data dir.
    commands: Vec<(String, Vec<String>)>,
    _dir: tempfile::TempDir,
}

fn spawn_cluster(kind: Kind, bin: &str, size: usize) -> Result<Cluster> {
    let dir = crate::layers::scratch_dir()?;
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 2 * size {
        let p = free_port()?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
    let initial: Vec<String> = (0..size).map(|i| format!("m{i}={}", peer(i))).collect();
    let initial = initial.join(",");
    let mut members = Vec::new();
    let mut commands = Vec::new();
    for i in 0..size {
        let client = format!("http://127.0.0.1:{}", ports[2 * i]);
        let data = dir.path().join(format!("m{i}"));
        let mut args: Vec<String> = [
            "--name",
            &format!("m{i}"),
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer(i),
            "--initial-advertise-peer-urls",
            &peer(i),
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            "bench-cluster",
            "--quota-backend-bytes",
            QUOTA_BYTES,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let own: &[&str] = match kind {
            Kind::MetaStore => &["--log-level", "warn"],
            Kind::Etcd => &[
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ],
        };
        args.extend(own.iter().map(|s| s.to_string()));
        let child = start_member(bin, &args)?;
        members.push(Some(Server::new(child, ports[2 * i], None)));
        commands.push((bin.to_string(), args));
    }
    Ok(Cluster {
        members,
        commands,
        _dir: dir,
    })
}

fn start_member(bin: &str, args: &[String]) -> Result<std::process::Child> {
    Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))
}

impl Cluster {
    fn endpoint(&self, i: usize) -> Option<String> {
        self.members[i]
            .as_ref()
            .map(|s| format!("127.0.0.1:{}", s.port))
    }

    /// The member every running member names as leader.
    async fn leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let mut named = Vec::new();
            let mut ids = Vec::new();
            for i in 0..self.members.len() {
                let Some(ep) = self.endpoint(i) else { continue };
                let status = async {
                    let mut c = etcd_client::Client::connect([ep], None).await?;
                    c.status().await
                };
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    named.push(s.leader());
                    ids.push((i, s.header().map(|h| h.member_id())));
                }
            }
            if let Some(&first) = named.first() {
                if first != 0 && named.iter().all(|&l| l == first) {
                    if let Some((i, _)) = ids.iter().find(|(_, id)| *id == Some(first)) {
                        return Ok(*i);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {within:?} (named: {named:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Time from `kill -9` of the leader to the first write acknowledged through a surviving
/// member that was sent after the kill: what a client of the cluster waits.
async fn failover(cluster: &mut Cluster) -> Result<Duration> {
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    let survivor = (0..cluster.members.len())
        .find(|&i| i != leader)
        .context("a survivor")?;
    let ep = cluster.endpoint(survivor).context("survivor endpoint")?;
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500));
    let mut client = etcd_client::Client::connect([ep], Some(opts)).await?;
    client.put("failover", "before", None).await?;
    let killed = cluster.members[leader].take().context("the leader runs")?;
    let killed_at = Instant::now();
    killed.kill().context("killing the leader")?;
    loop {
        if client.put("failover", "after", None).await.is_ok() {
            return Ok(killed_at.elapsed());
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            bail!("no write acknowledged within 60 s of killing the leader");
        }
    }
}

/// What a rolling restart cost: its duration and the writes of a steady load meanwhile.
struct RollingRestart {
    took: Duration,
    acked: u64,
    retryable: u64,
    failed: Vec<String>,
}

/// Each member in turn: SIGTERM, wait for it to exit, start it again on its data dir, wait
/// until it serves (Status and a put through it); meanwhile one client writes through every
/// member, one request at a time.
async fn rolling_restart(cluster: &mut Cluster) -> Result<RollingRestart> {
    let endpoints: Vec<String> = (0..cluster.members.len())
        .filter_map(|i| cluster.endpoint(i))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(5));
            let mut client = etcd_client::Client::connect(endpoints, Some(opts)).await?;
            let (mut acked, mut retryable, mut failed) = (0u64, 0u64, Vec::new());
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                match client.put(format!("rolling/{}", n % 1000), "v", None).await {
                    Ok(_) => acked += 1,
                    // What etcd's clients retry: no leader, leader changed, timed out, and a
                    // member going away under the connection.
                    Err(etcd_client::Error::GRpcStatus(s))
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::Cancelled
                        ) =>
                    {
                        retryable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    // The connection to a member going down under the request: the client
                    // reconnects to another and retries.
                    Err(etcd_client::Error::TransportError(_)) => {
                        retryable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.code() == tonic::Code::Unknown
                            && s.message().contains("transport error") =>
                    {
                        retryable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    // A request the stopping member refused with its HTTP/2 GOAWAY (NO_ERROR):
                    // RFC 9113 §6.8 — never processed, safe to retry; grpc-go retries it
                    // transparently, tonic reports it as Internal.
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.code() == tonic::Code::Internal
                            && format!("{s:?}").contains("GoAway")
                            && format!("{s:?}").contains("NO_ERROR") =>
                    {
                        retryable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            anyhow::Ok((acked, retryable, failed))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for i in 0..cluster.members.len() {
        let Some(mut server) = cluster.members[i].take() else {
            continue;
        };
        let port = server.port;
        let pid = server.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let waited = Instant::now();
        loop {
            if server.child.try_wait()?.is_some() {
                break;
            }
            if waited.elapsed() > Duration::from_secs(30) {
                bail!("member {i} did not stop within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(server);
        let (bin, args) = &cluster.commands[i];
        let child = start_member(bin, args)?;
        cluster.members[i] = Some(Server::new(child, port, None));
        wait_ready(port, Probe::StatusAndPut, READY_TIMEOUT).await?;
    }
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (acked, retryable, failed) = writer.await??;
    Ok(RollingRestart {
        took,
        acked,
        retryable,
        failed,
    })
}

struct Case {
    name: &'static str,
    through_leader: bool,
    workload: Workload,
    reads: bool,
}

fn cases() -> Vec<Case> {
    let linearizable = Workload::Range(RangeArgs {
        consistency: Consistency::L,
        limit: 0,
        prefix: None,
        span: 0,
    });
    vec![
        Case {
            name: "put-c256-leader",
            through_leader: true,
            workload: Workload::Put,
            reads: false,
        },
        Case {
            name: "put-c256-follower",
            through_leader: false,
            workload: Workload::Put,
            reads: false,
        },
        Case {
            name: "range-l-c256-follower",
            through_leader: false,
            workload: linearizable,
            reads: true,
        },
    ]
}

/// Runs the cluster cases against MetaStore and, when `etcd` is given, etcd.
pub(crate) async fn run(
    size: usize,
    bin_dir: &Path,
    etcd: Option<&str>,
    duration: Duration,
    smoke: bool,
    rec: &mut Recorder,
) -> Result<()> {
    if size < 3 {
        bail!("--cluster needs at least 3 members");
    }
    let metastore = bin_dir.join("metastore");
    let mut kinds = vec![(Kind::MetaStore, metastore.to_string_lossy().into_owned())];
    if let Some(etcd) = etcd {
        kinds.push((Kind::Etcd, etcd.to_string()));
    }
    let key_space: u64 = if smoke { 1_000 } else { 10_000 };
    let mut table: Vec<(Kind, String, f64, f64)> = Vec::new();
    for (kind, bin) in &kinds {
        let mut cluster = spawn_cluster(*kind, bin, size)?;
        for i in 0..size {
            let port = cluster.members[i].as_ref().map(|s| s.port).unwrap_or(0);
            wait_ready(port, Probe::StatusAndPut, READY_TIMEOUT).await?;
        }
        let leader = cluster.leader(Duration::from_secs(30)).await?;
        let follower = (0..size).find(|&i| i != leader).context("a follower")?;
        let mut loaded = false;
        for case in cases() {
            let target = if case.through_leader {
                leader
            } else {
                follower
            };
            let endpoints = cluster.endpoint(target).context("running member")?;
            let pid = cluster.members[target].as_ref().map(|s| s.child.id());
            let base = Common {
                endpoints,
                key_space_size: key_space,
                no_progress: true,
                ..Common::default()
            };
            if case.reads && !loaded {
                let load = Common {
                    clients: 64,
                    conns: 16,
                    total: key_space,
                    sequential_keys: true,
                    check_every: 0,
                    ..base.clone()
                };
                metastore_bench::run(&Workload::Put, &load).await?;
                loaded = true;
            }
            if !smoke {
                wait_for_quiet_machine(0.10, Duration::from_secs(20)).await;
            }
            let common = Common {
                clients: if smoke { 8 } else { 256 },
                conns: if smoke { 8 } else { 100 },
                duration: Some(duration),
                server_pid: pid,
                ..base
            };
            let report: Report = metastore_bench::run(&case.workload, &common)
                .await
                .with_context(|| format!("{} against {}", case.name, kind.label()))?;
            if *kind == Kind::MetaStore && report.error_count() > 0 {
                bail!(
                    "{} against MetaStore failed: {:?}",
                    case.name,
                    report.errors
                );
            }
            rec.add(
                "cluster",
                &format!("{}-{}-{size}", kind.label(), case.name),
                &[
                    ("ops_per_sec", report.ops_per_sec),
                    ("p50_ms", report.latency_ms.p50),
                    ("p99_ms", report.latency_ms.p99),
                ],
            );
            table.push((
                *kind,
                case.name.to_string(),
                report.ops_per_sec,
                report.latency_ms.p99,
            ));
        }
        let rolled = rolling_restart(&mut cluster).await?;
        if *kind == Kind::MetaStore && !rolled.failed.is_empty() {
            bail!(
                "rolling restart of {}: writes failed with non-retryable errors: {:?}",
                kind.label(),
                rolled.failed
            );
        }
        rec.add(
            "cluster",
            &format!("{}-rolling-restart-{size}", kind.label()),
            &[
                ("seconds", rolled.took.as_secs_f64()),
                ("writes_acked", rolled.acked as f64),
                ("writes_retried", rolled.retryable as f64),
                ("writes_failed", rolled.failed.len() as f64),
            ],
        );
        table.push((
            *kind,
            "rolling restart (s)".into(),
            rolled.took.as_secs_f64(),
            0.0,
        ));
        let took = failover(&mut cluster).await?;
        rec.add(
            "cluster",
            &format!("{}-failover-{size}", kind.label()),
            &[("seconds", took.as_secs_f64())],
        );
        table.push((*kind, "failover (s)".into(), took.as_secs_f64(), 0.0));
        drop(cluster);
    }
    eprintln!("\n{size}-member clusters, one at a time:");
    eprintln!(
        "{:<10} {:<24} {:>12} {:>10}",
        "server", "case", "ops/s", "p99 ms"
    );
    for (kind, case, ops, p99) in &table {
        eprintln!(
            "{:<10} {:<24} {:>12.1} {:>10.2}",
            kind.label(),
            case,
            ops,
            p99
        );
    }
    Ok(())
}
