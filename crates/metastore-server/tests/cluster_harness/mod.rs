//! A cluster of real `metastore` processes on loopback, for the cluster test files.
#![allow(dead_code)]

use etcd_client::{Client, ConnectOptions, GetOptions};
use metastore_faultproxy::{FaultControl, FaultProxy};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// The peer port the other members are told to dial: `peer_port` itself, or the port of
    /// the fault proxy in front of it.
    pub advertise_peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Started with `--witness`: it serves no clients, so client-side checks skip it.
    pub witness: bool,
}

pub struct Cluster {
    _root: tempfile::TempDir,
    pub members: Vec<Member>,
    pub initial_cluster: String,
    /// Flags every member starts with, beside the cluster's own.
    pub extra_args: Vec<String>,
    /// With [`Cluster::create_proxied`], proxy `i` carries every byte sent TO member `i` on
    /// the peer port (raft messages and snapshots: the sender dials the receiver), so faults
    /// on it cut what member `i` hears, not what it says.
    pub proxies: Vec<FaultProxy>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Cluster {
    pub fn start(size: usize) -> Cluster {
        let mut cluster = Cluster::create(size);
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster
    }

    /// The members' ports, data dirs and flags; no process started yet.
    pub fn create(size: usize) -> Cluster {
        Cluster::build(size, false)
    }

    /// As [`Cluster::create`], with a fault proxy in front of each member's peer port (see
    /// [`Cluster::proxies`]). Must run inside a tokio runtime, which the proxies live on.
    pub fn create_proxied(size: usize) -> Cluster {
        Cluster::build(size, true)
    }

    /// The fault switch of the proxy carrying the traffic to member `i`.
    pub fn proxy(&self, i: usize) -> FaultControl {
        self.proxies[i].control()
    }

    fn build(size: usize, proxied: bool) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("metastore-cluster-")
            .tempdir()
            .expect("tempdir");
        let mut ports = Vec::new();
        // The proxies bind ports of this list too, rather than port 0: an ephemeral port the
        // kernel hands out could be one a member is about to bind.
        let per_member = if proxied { 3 } else { 2 };
        while ports.len() < size * per_member {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut proxies = Vec::new();
        if proxied {
            for i in 0..size {
                let listen = SocketAddr::from(([127, 0, 0, 1], ports[2 * size + i]));
                let upstream = SocketAddr::from(([127, 0, 0, 1], ports[2 * i + 1]));
                proxies.push(FaultProxy::start(listen, upstream).expect("start fault proxy"));
            }
        }
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                advertise_peer_port: proxies
                    .get(i)
                    .map_or(ports[2 * i + 1], |p| p.local_addr().port()),
                data_dir: root.path().join(format!("m{}", i + 1)),
                log: root.path().join(format!("m{}.log", i + 1)),
                child: None,
                witness: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.advertise_peer_port))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            _root: root,
            members,
            initial_cluster,
            extra_args: Vec::new(),
            proxies,
        }
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    pub fn spawn(&mut self, i: usize) {
        let ic = self.initial_cluster.clone();
        self.spawn_with(i, &ic, &[]);
    }

    /// Starts member `i` with this `--initial-cluster` and these flags beside the usual ones.
    pub fn spawn_with(&mut self, i: usize, ic: &str, flags: &[&str]) {
        let m = &mut self.members[i];
        assert!(m.child.is_none());
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let advertised_peer = format!("http://127.0.0.1:{}", m.advertise_peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metastore"));
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &advertised_peer])
            .args(["--initial-cluster", ic])
            .args(["--initial-cluster-token", "cluster-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Ok(storage) = std::env::var("METASTORE_TEST_STORAGE") {
            cmd.args(["--storage", &storage]);
        }
        cmd.args(&self.extra_args);
        cmd.args(flags);
        m.child = Some(cmd.spawn().expect("spawn metastore"));
    }

    /// Starts member `i` as a witness (`--witness`).
    pub fn spawn_witness(&mut self, i: usize) {
        let ic = self.initial_cluster.clone();
        self.members[i].witness = true;
        self.spawn_with(i, &ic, &["--witness"]);
    }

    /// A slot for a member outside the initial cluster (ports, data dir, log), to be added at
    /// runtime; nothing started.
    pub fn add_slot(&mut self) -> usize {
        let i = self.members.len();
        let taken: Vec<u16> = self
            .members
            .iter()
            .flat_map(|m| [m.client_port, m.peer_port, m.advertise_peer_port])
            .collect();
        let mut ports = Vec::new();
        while ports.len() < 2 {
            let p = free_port();
            if !taken.contains(&p) && !ports.contains(&p) {
                ports.push(p);
            }
        }
        let name = format!("m{}", i + 1);
        self.members.push(Member {
            client_port: ports[0],
            peer_port: ports[1],
            advertise_peer_port: ports[1],
            data_dir: self._root.path().join(&name),
            log: self._root.path().join(format!("{name}.log")),
            name,
            child: None,
            witness: false,
        });
        i
    }

    /// The peer URL member `i` advertises.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].advertise_peer_port)
    }

    /// Starts member `i`, already added with `member add`, to join the cluster of `with`
    /// (`--initial-cluster-state existing`, as etcdctl's `member add` tells an operator).
    pub fn spawn_joining(&mut self, i: usize, with: &[usize]) {
        let ic = with
            .iter()
            .chain(std::iter::once(&i))
            .map(|&j| format!("{}={}", self.members[j].name, self.peer_url(j)))
            .collect::<Vec<_>>()
            .join(",");
        self.spawn_with(i, &ic, &["--initial-cluster-state", "existing"]);
    }

    /// Waits up to `within` for member `i`'s process to exit on its own.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.members[i].child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.members[i].child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs etcdctl (v3) against the client ports of `members`; (success, stdout + stderr).
    pub fn etcdctl(&self, members: &[usize], args: &[&str]) -> (bool, String) {
        // host:port, not a URL: etcdctl 3.4's `endpoint` commands put the scheme into h2's
        // `:authority`, which the server refuses.
        let endpoints = members
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.members[i].client_port))
            .collect::<Vec<_>>()
            .join(",");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "--command-timeout", "15s"])
            .args(args)
            .output()
            .expect("run etcdctl (the test command's setup installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` ("-STOP", "-CONT", ...) to member `i`'s process.
    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.members[i]
            .child
            .as_ref()
            .expect("running member")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    pub async fn client(&self, i: usize) -> Client {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Client::connect([self.endpoint(i)], Some(opts))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.endpoint(i)))
    }

    /// The member that reports itself leader, once every running member agrees on it.
    pub async fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() || m.witness {
                    continue;
                }
                let status = async {
                    let mut c = self.client(i).await;
                    c.status().await
                };
                match tokio::time::timeout(Duration::from_secs(2), status).await {
                    Ok(Ok(s)) => seen.push((i, s.header().map(|h| h.member_id()), s.leader())),
                    _ => seen.push((i, None, 0)),
                }
            }
            let leaders: Vec<u64> = seen.iter().map(|(_, _, l)| *l).collect();
            if leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
                if let Some((i, _, _)) = seen.iter().find(|(_, id, _)| *id == Some(leaders[0])) {
                    return *i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {within:?}: {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every member's HashKV at `revision`, once each has applied it; panics after `within`.
    pub async fn hashes_at(&self, revision: i64, within: Duration) -> Vec<(u32, i64)> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.hashes_of(&all, revision, within).await
    }

    /// As [`Cluster::hashes_at`], of the given members only.
    pub async fn hashes_of(
        &self,
        members: &[usize],
        revision: i64,
        within: Duration,
    ) -> Vec<(u32, i64)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for &i in members {
            loop {
                let got = async {
                    let mut c = self.client(i).await;
                    c.hash_kv(revision).await
                };
                match tokio::time::timeout(Duration::from_secs(5), got).await {
                    Ok(Ok(h)) => {
                        out.push((h.hash(), h.compact_version()));
                        break;
                    }
                    // Not applied that far yet ("future revision"), or not serving yet.
                    _ => {
                        assert!(
                            Instant::now() < deadline,
                            "member {i} never reached revision {revision}\n{}",
                            self.logs()
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        out
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(30);
            out.push_str(&format!(
                "---- {} ----\n{}\n",
                m.name,
                lines[from..].join("\n")
            ));
        }
        out
    }

    /// Every key and value of member `i`, read from it alone (serializable); None while it
    /// does not answer yet (a restarted member serves once its log is replayed).
    pub async fn contents(&self, i: usize) -> Option<BTreeMap<String, String>> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let mut c = Client::connect([self.endpoint(i)], Some(opts)).await.ok()?;
        let resp = c
            .get(
                "",
                Some(GetOptions::new().with_all_keys().with_serializable()),
            )
            .await
            .ok()?;
        Some(
            resp.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster logs at failure:\n{}", self.logs());
        }
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}

/// Snapshots every 100 entries and a leader that keeps only 50 entries for slow followers: a
/// member a few hundred writes behind (killed, paused, cut off) needs a snapshot install.
pub const SMALL_LOG_ARGS: [&str; 4] = [
    "--snapshot-count",
    "100",
    "--experimental-snapshot-catchup-entries",
    "50",
];

impl Cluster {
    /// Starts every member with `SMALL_LOG_ARGS`.
    pub fn start_small_log(mut self) -> Cluster {
        self.extra_args = SMALL_LOG_ARGS.iter().map(|s| s.to_string()).collect();
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self
    }
}
