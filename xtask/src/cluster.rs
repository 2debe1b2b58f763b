//! `cargo xtask bench e2e --cluster N [--vs-etcd]`: an N-member MetaStore cluster and, with
//! `--vs-etcd`, an N-member etcd with the same raft timing (100 ms heartbeat, 1 s election
//! timeout), one cluster at a time on this machine. Each runs writes through the leader and
//! through a follower and linearizable reads on a follower, then measures failover: the time
//! from `kill -9` of the leader to the first write acknowledged by the survivors.

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
    for i in 0..size {
        let client = format!("http://127.0.0.1:{}", ports[2 * i]);
        let data = dir.path().join(format!("m{i}"));
        let mut cmd = Command::new(bin);
        cmd.args(["--name", &format!("m{i}")])
            .args(["--data-dir", &data.to_string_lossy()])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer(i)])
            .args(["--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "bench-cluster"])
            .args(["--quota-backend-bytes", QUOTA_BYTES])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match kind {
            Kind::MetaStore => {
                cmd.args(["--log-level", "warn"]);
            }
            Kind::Etcd => {
                cmd.args(["--initial-cluster-state", "new"])
                    .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                    .args(["--logger", "zap", "--log-level", "error"]);
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        members.push(Some(Server::new(child, ports[2 * i], None)));
    }
    Ok(Cluster { members, _dir: dir })
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
