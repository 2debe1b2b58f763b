//! What an operator meets first: `--version`, where the log goes and what it looks like, the
//! systemd readiness notification, and the shipped systemd unit. Real binary, real files.

mod common;

use common::TestServer;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metastore"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_binary(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run metastore");
    assert!(out.status.success(), "metastore {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn version_prints_etcds_layout_with_this_commit() {
    let text = run_binary(&["--version"]);
    assert_eq!(text, run_binary(&["version"]), "flag and subcommand agree");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(
        lines[0],
        format!("metastore Version: {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(lines[2].starts_with("Rust Version: 1."), "{text}");
    assert_eq!(lines[4], "API Version: 3.5");
    // The SHA must follow commits (build.rs reruns on a new HEAD), never stay at an old one.
    let head = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(repo_root())
        .output()
        .expect("git");
    if head.status.success() {
        let sha = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert_eq!(lines[1], format!("Git SHA: {sha}"));
    }
}

/// Starts a member with `args`, waits until it serves, stops it, and returns its log files
/// (stdout, stderr) as the test harness captured them.
async fn run_member(args: &[&str]) -> (TestServer, String, String) {
    let mut srv = TestServer::start_with_args(args).await;
    let mut client = srv.client().await;
    client.put("k", "v", None).await.expect("put");
    drop(client);
    let status = srv.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean stop: {status:?}"
    );
    let root = srv.data_dir().parent().expect("root").to_path_buf();
    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap_or_default();
    let (out, err) = (
        read("metastore-1.stdout.log"),
        read("metastore-1.stderr.log"),
    );
    (srv, out, err)
}

// Multi-threaded: the dropped client's connection must close while `terminate` blocks,
// or the server's graceful stop waits for the HTTP/2 keepalive to give up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_goes_to_stderr_by_default_as_etcds_does() {
    let (_srv, out, err) = run_member(&[]).await;
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(err.contains("ready to serve client requests"), "{err}");
    assert!(
        err.contains("metastore version"),
        "the start log names the version: {err}"
    );
    assert!(
        !err.contains('\x1b'),
        "no colour escapes when stderr is a file"
    );
}

// Multi-threaded: the dropped client's connection must close while `terminate` blocks,
// or the server's graceful stop waits for the HTTP/2 keepalive to give up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_holds_plain_text_without_escape_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("metastore.log");
    let log_arg = log.display().to_string();
    let (_srv, out, err) = run_member(&["--log-outputs", &log_arg]).await;
    let bytes = std::fs::read(&log).expect("log file");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("ready to serve client requests"), "{text}");
    assert!(
        !bytes.contains(&0x1b),
        "an escape byte in the log file: {text}"
    );
    assert!(
        out.is_empty() && err.is_empty(),
        "only the file: {out} {err}"
    );
}

// Multi-threaded: the dropped client's connection must close while `terminate` blocks,
// or the server's graceful stop waits for the HTTP/2 keepalive to give up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_on_every_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("metastore.json");
    let outputs = format!("stdout,{}", log.display());
    let (_srv, out, _err) = run_member(&["--log-format", "json", "--log-outputs", &outputs]).await;
    let file = std::fs::read_to_string(&log).expect("log file");
    for text in [&out, &file] {
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let version = events
            .iter()
            .find(|e| e["message"] == "metastore version")
            .unwrap_or_else(|| panic!("no version event: {text}"));
        assert_eq!(version["level"], "INFO");
        assert_eq!(version["api_version"], "3.5");
        assert!(version["git_sha"].is_string());
        assert!(events
            .iter()
            .any(|e| e["message"] == "ready to serve client requests"));
    }
}

// Multi-threaded: the dropped client's connection must close while `terminate` blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_are_logged_with_keys_and_sizes_never_values() {
    let mut srv =
        TestServer::start_with_args(&["--warning-apply-duration", "1ns", "--log-format", "json"])
            .await;
    let mut client = srv.client().await;
    let secret = "a-value-no-log-may-hold";
    client.put("slowkey", secret, None).await.expect("put");
    client.get("slowkey", None).await.expect("get");
    drop(client);
    assert!(srv
        .terminate(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    let root = srv.data_dir().parent().expect("root").to_path_buf();
    let log = std::fs::read_to_string(root.join("metastore-1.stderr.log")).expect("log");
    let slow: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["message"] == "apply request took too long")
        .collect();
    let put = slow
        .iter()
        .find(|e| e["prefix"] == "")
        .unwrap_or_else(|| panic!("no slow put: {log}"));
    assert_eq!(
        put["request"],
        format!(r#"put:<key:"slowkey" value_size:{} >"#, secret.len())
    );
    assert_eq!(put["level"], "WARN");
    assert!(put["response"]
        .as_str()
        .is_some_and(|r| r.starts_with("size:")));
    assert!(put["took"].is_string() && put["expected_duration"] == "1ns");
    let range = slow
        .iter()
        .find(|e| e["prefix"] == "read-only range ")
        .unwrap_or_else(|| panic!("no slow range: {log}"));
    assert_eq!(range["request"], r#"key:"slowkey" "#);
    assert!(range["response"]
        .as_str()
        .is_some_and(|r| r.starts_with("range_response_count:1 size:")));
    assert!(!log.contains(secret), "a value reached the log: {log}");
}

#[test]
fn a_bad_log_output_is_refused_at_start() {
    let out = Command::new(binary())
        .args(["--log-outputs", "/nonexistent-dir/metastore.log"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open log output /nonexistent-dir/metastore.log"),
        "{err}"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `Type=notify` in the unit: READY=1 comes only once clients can be served, STOPPING=1 at
/// SIGTERM, even one sent the moment READY=1 arrives (the signal handler is in place before).
#[test]
fn systemd_hears_ready_once_the_member_serves_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let data_dir = dir.path().join("data");
    let mut child = Command::new(binary())
        .args(["--name", "n1", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("n1={peer_url}")])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 60 s");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means serving: the client port takes connections now, not some time later.
    std::net::TcpStream::connect(("127.0.0.1", client_port)).expect("client port bound");
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// `systemd-analyze verify` accepts the shipped unit without a warning. It only prints
/// warnings for unknown keys or bad values (exit 0), so any output counts as a failure.
#[test]
fn the_shipped_systemd_unit_verifies() {
    let analyze = "systemd-analyze";
    let present = Command::new(analyze).arg("--version").output().is_ok();
    assert!(
        present,
        "{analyze} is missing: bash scripts/setup.sh installs Debian's systemd package"
    );
    let unit = std::fs::read_to_string(repo_root().join("configs/metastore.service"))
        .expect("configs/metastore.service");
    // verify checks that ExecStart's binary exists: point it at the one cargo built.
    let installed = "/usr/local/bin/metastore";
    assert!(unit.contains(&format!("ExecStart={installed} ")), "{unit}");
    let unit = unit.replace(installed, &binary().display().to_string());
    let verify = |text: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metastore.service");
        std::fs::write(&path, text).expect("write unit");
        let out = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let (ok, said) = verify(&unit);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The check catches what it is for: a misspelt key is reported.
    let (_, said) = verify(&unit.replace("Restart=on-failure", "Restrat=on-failure"));
    assert!(said.contains("Restrat"), "a bad key goes unnoticed: {said}");
}

/// The leader sets the replicated cluster version soon after it starts leading: the gate that
/// keeps a mixed cluster from proposing what an older member cannot read.
#[tokio::test]
async fn the_leader_sets_the_cluster_version() {
    let srv = TestServer::start().await;
    let log = srv
        .data_dir()
        .parent()
        .expect("root")
        .join("metastore-1.stderr.log");
    let want = format!(
        "to={}",
        env!("CARGO_PKG_VERSION")
            .rsplit_once('.')
            .map(|(major_minor, _)| major_minor)
            .expect("x.y.z")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("cluster version set") && l.contains(&want))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 'cluster version set {want}' in the log: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
