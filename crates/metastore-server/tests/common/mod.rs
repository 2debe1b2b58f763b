//! Shared black-box harness for the `metastore` integration tests.
//!
//! `TestServer` spawns the real `metastore` binary (a single-member cluster
//! speaking etcd's v3 gRPC API) on free loopback ports with its own data
//! directory, waits until it answers `Maintenance/Status`, and kills it on
//! drop. Tests talk to it only through the `etcd-client` crate, so they hold
//! the server to etcd's wire behaviour rather than to its internals.
//!
//! Environment knobs:
//! * `METASTORE_TEST_STORAGE=rocksdb` - start the server with `--storage rocksdb`
//! * `METASTORE_TEST_BIN` - run this binary instead of the one cargo built
//!   (handy to check the suite itself against a real `etcd`).
//! * `METASTORE_TEST_INHERIT_LOGS=1` - let the server write to the test's
//!   stdout/stderr instead of log files.
#![allow(dead_code)]

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

/// Member name every test server is started with.
pub const MEMBER_NAME: &str = "ms-test";

/// How long `start`/`restart` wait for the server to answer `status()`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After `status()` answers, how long to wait for a leader to be reported
/// before going on anyway (a single member elects itself almost at once).
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn binary_path() -> PathBuf {
    if let Some(p) = std::env::var_os("METASTORE_TEST_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_metastore"))
}

/// Resident memory of a process, in bytes (0 once it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Reserve two distinct free ports on 127.0.0.1 (bind to :0, then drop).
fn pick_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let pa = a.local_addr().expect("local_addr").port();
    let pb = b.local_addr().expect("local_addr").port();
    drop(a);
    drop(b);
    (pa, pb)
}

pub struct TestServer {
    /// Keeps the temporary root alive (None when the caller gave a data dir).
    _tmp: Option<TempDir>,
    /// Holds the data dir and the log files.
    root: PathBuf,
    data_dir: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
    /// Number of times the binary has been spawned (numbers the log files).
    spawns: u32,
    inherit_logs: bool,
}

impl TestServer {
    /// Start a fresh server in a new temporary data dir.
    pub async fn start() -> TestServer {
        Self::start_with_args(&[]).await
    }

    /// Start a fresh server with extra command line arguments,
    /// e.g. `&["--max-txn-ops", "4"]`.
    pub async fn start_with_args(extra: &[&str]) -> TestServer {
        let tmp = tempfile::Builder::new()
            .prefix("metastore-test-")
            .tempdir()
            .expect("create temp dir");
        let root = tmp.path().to_path_buf();
        let data_dir = root.join("data");
        Self::launch(Some(tmp), root, data_dir, extra).await
    }

    /// Start a server on the given data dir (created if missing). Logs go to
    /// the data dir's parent.
    pub async fn start_in(data_dir: &Path, extra: &[&str]) -> TestServer {
        let root = data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::launch(None, root, data_dir.to_path_buf(), extra).await
    }

    async fn launch(
        tmp: Option<TempDir>,
        root: PathBuf,
        data_dir: PathBuf,
        extra: &[&str],
    ) -> TestServer {
        let inherit_logs = std::env::var("METASTORE_TEST_INHERIT_LOGS")
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        let (client_port, peer_port) = pick_ports();
        let mut srv = TestServer {
            _tmp: tmp,
            root,
            data_dir,
            name: MEMBER_NAME.to_string(),
            client_port,
            peer_port,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            spawns: 0,
            inherit_logs,
        };
        // Another process may grab a port between pick and bind; if the
        // server dies before becoming ready, retry on new ports (fresh data
        // dirs only: a given data dir may already hold peer URLs).
        let mut attempts = 0;
        loop {
            attempts += 1;
            srv.spawn();
            match srv.wait_ready().await {
                Ok(()) => return srv,
                Err(e) if attempts < 3 && srv.child_exited() && srv._tmp.is_some() => {
                    eprintln!("metastore failed to start ({e}); retrying on new ports");
                    eprintln!("{}", srv.log_tail());
                    srv.kill9();
                    let _ = fs::remove_dir_all(&srv.data_dir);
                    let (c, p) = pick_ports();
                    srv.client_port = c;
                    srv.peer_port = p;
                }
                Err(e) => {
                    // Drop prints the log tail while unwinding.
                    srv.kill9();
                    panic!("metastore did not become ready: {e}");
                }
            }
        }
    }

    fn args(&self) -> Vec<String> {
        let client_url = self.endpoint();
        let peer_url = self.peer_url();
        let mut args = vec![
            "--name".to_string(),
            self.name.clone(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "--listen-client-urls".to_string(),
            client_url.clone(),
            "--advertise-client-urls".to_string(),
            client_url,
            "--listen-peer-urls".to_string(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".to_string(),
            peer_url.clone(),
            "--initial-cluster".to_string(),
            format!("{}={}", self.name, peer_url),
        ];
        // The same suites run on either engine: METASTORE_TEST_STORAGE=rocksdb.
        if let Ok(storage) = std::env::var("METASTORE_TEST_STORAGE") {
            if !self.extra_args.iter().any(|a| a == "--storage") {
                args.push("--storage".to_string());
                args.push(storage);
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.spawns += 1;
        let mut cmd = Command::new(binary_path());
        cmd.args(self.args()).stdin(Stdio::null());
        if self.inherit_logs {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            let out = File::create(self.stdout_log(self.spawns)).expect("create stdout log");
            let err = File::create(self.stderr_log(self.spawns)).expect("create stderr log");
            cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary_path().display()));
        self.child = Some(child);
    }

    fn stdout_log(&self, n: u32) -> PathBuf {
        self.root.join(format!("metastore-{n}.stdout.log"))
    }

    fn stderr_log(&self, n: u32) -> PathBuf {
        self.root.join(format!("metastore-{n}.stderr.log"))
    }

    /// The last lines of the current run's logs (for failure messages).
    /// Everything the current process wrote to stdout and stderr (empty with inherited logs).
    pub fn logs(&self) -> String {
        if self.inherit_logs || self.spawns == 0 {
            return String::new();
        }
        [self.stdout_log(self.spawns), self.stderr_log(self.spawns)]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log_tail(&self) -> String {
        if self.inherit_logs || self.spawns == 0 {
            return String::new();
        }
        let mut s = String::new();
        for p in [self.stdout_log(self.spawns), self.stderr_log(self.spawns)] {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            s.push_str(&format!(
                "---- {} (last {} lines) ----\n",
                p.display(),
                lines.len() - from
            ));
            for l in &lines[from..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn child_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = String::from("no attempt made");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("process exited early with {status}"));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}; last error: {last_err}"
                ));
            }
            match self.try_status().await {
                Ok(_) => break,
                Err(e) => last_err = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Ready. Give the single member a moment to report itself as leader so
        // the first request of a test does not race the election.
        let deadline = Instant::now() + LEADER_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(leader) = self.try_status().await {
                if leader != 0 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("warning: server answers status() but reports no leader; going on");
        Ok(())
    }

    /// One connect + status() round, each bounded. Returns the leader id.
    async fn try_status(&self) -> Result<u64, String> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        let fut = async {
            let mut c = Client::connect([self.endpoint()], Some(opts))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match c.status().await {
                Ok(st) => Ok::<u64, String>(st.leader()),
                // Auth is on (etcd 3.5 wants a user for Status): ask /health, which says
                // whether a leader is known.
                Err(e) if e.to_string().contains("user name is empty") => {
                    if self.http_health().await {
                        Ok(u64::MAX)
                    } else {
                        Ok(0)
                    }
                }
                Err(e) => Err(format!("status: {e}")),
            }
        };
        match tokio::time::timeout(Duration::from_secs(3), fut).await {
            Ok(r) => r,
            Err(_) => Err("connect+status timed out".to_string()),
        }
    }

    /// Whether `GET /health` answers `"health":"true"`.
    async fn http_health(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.client_port)).await
        else {
            return false;
        };
        let ask = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if conn.write_all(ask).await.is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).contains("\"health\":\"true\"")
    }

    /// `http://127.0.0.1:PORT` of the client listener.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:PORT` of the peer listener.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// OS process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connected client with a 60 s per-request timeout (debug builds are slow).
    pub async fn client(&self) -> Client {
        self.client_with_timeout(Duration::from_secs(60)).await
    }

    /// A connected client whose requests fail after `timeout`.
    pub async fn client_with_timeout(&self, timeout: Duration) -> Client {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(timeout);
        Client::connect([self.endpoint()], Some(opts))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.endpoint()))
    }

    /// SIGKILL the server (std's `Child::kill` is SIGKILL on unix) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the server and wait up to `timeout` for it to exit. Returns
    /// its exit status, or None if it had to be SIGKILLed after the timeout.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// Start the binary again on the same data dir and ports (kills it first
    /// if it is still running) and wait until it is ready.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(e) = self.wait_ready().await {
            // Drop prints the log tail while unwinding.
            self.kill9();
            panic!("metastore did not become ready after restart: {e}");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = self.log_tail();
            if !tail.is_empty() {
                eprintln!("metastore logs at test failure:\n{tail}");
            }
        }
        self.kill9();
    }
}
