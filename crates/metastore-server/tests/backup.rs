//! Backups in etcd's format, read by etcd's own tools: `etcdctl snapshot save` against
//! MetaStore (while writes go on), `etcdctl snapshot status` and `snapshot restore` on the
//! file (bbolt reads it), and a real etcd started on the restored data dir serves the same
//! keys, values, revisions and leases. And the way in: an etcd's snapshot restored by
//! `metastore snapshot restore` serves the same in MetaStore, and goes back to etcd.

mod common;

use common::TestServer;
use serde_json::Value;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// etcdctl (v3 API); endpoints as host:port (etcdctl 3.4 sends a scheme-qualified endpoint as
/// the HTTP/2 authority).
fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let host = endpoint.trim_start_matches("http://");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", host, "--command-timeout", "20s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Every key and value at a revision (0: the current one), with their revisions.
fn contents(endpoint: &str, revision: i64) -> Vec<(String, String, i64, i64, i64)> {
    let rev = format!("--rev={revision}");
    let out = json(&etcdctl(
        endpoint,
        &["get", "", "--prefix", &rev, "-w", "json"],
    ));
    let b64 = |v: &Value| {
        let s = v.as_str().unwrap_or_default();
        String::from_utf8(decode_base64(s)).expect("utf-8")
    };
    out["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    (
                        b64(&kv["key"]),
                        b64(&kv["value"]),
                        kv["create_revision"].as_i64().unwrap_or(0),
                        kv["mod_revision"].as_i64().unwrap_or(0),
                        kv["lease"].as_i64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode_base64(s: &str) -> Vec<u8> {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = TABLE.iter().position(|t| *t == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn metastore(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args(args)
        .output()
        .expect("run metastore");
    assert!(out.status.success(), "metastore {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A child process (etcd or a MetaStore server) killed when the test ends.
struct Process(Child);

impl Process {
    /// A fresh etcd on loopback; its client endpoint once it answers.
    fn etcd(dir: &std::path::Path) -> (Process, String) {
        let peer = format!("http://127.0.0.1:{}", free_port());
        Process::etcd_named(dir, "e", &peer)
    }

    /// etcd member `name` on `dir` (a data dir `etcdctl snapshot restore` made, or a new one)
    /// with the peer URL it was given; its client endpoint once it answers.
    fn etcd_named(dir: &std::path::Path, name: &str, peer: &str) -> (Process, String) {
        let ep = format!("http://127.0.0.1:{}", free_port());
        let etcd = Process(
            Command::new("etcd")
                .args(["--name", name, "--data-dir", dir.to_str().expect("utf-8")])
                .args(["--listen-client-urls", &ep, "--advertise-client-urls", &ep])
                .args([
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                ])
                .args(["--initial-cluster", &format!("{name}={peer}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd (Debian's etcd-server)"),
        );
        wait_healthy(&ep);
        (etcd, ep)
    }
}

/// `etcdctl snapshot restore` of `file` into `data_dir` for a one-member cluster.
fn etcd_restore(file: &std::path::Path, data_dir: &std::path::Path, name: &str, peer: &str) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", file.to_str().expect("utf-8")])
        .args(["--data-dir", data_dir.to_str().expect("utf-8")])
        .args([
            "--name",
            name,
            "--initial-cluster",
            &format!("{name}={peer}"),
        ])
        .args(["--initial-advertise-peer-urls", peer])
        .output()
        .expect("etcdctl snapshot restore");
    assert!(out.status.success(), "etcdctl snapshot restore: {out:?}");
}

fn wait_healthy(ep: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                ep.trim_start_matches("http://"),
                "endpoint",
                "health",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "etcd at {ep} did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn snapshot_status_reads_etcds_own_files_as_etcdctl_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_etcd, ep) = Process::etcd(&dir.path().join("etcd"));
    for i in 0..500 {
        etcdctl(&ep, &["put", &format!("k{i}"), &"v".repeat(i % 50 + 1)]);
        if i % 100 == 0 {
            etcdctl(&ep, &["del", &format!("k{}", i / 2)]);
        }
    }
    let lease = etcdctl(&ep, &["lease", "grant", "300"]);
    let id = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    etcdctl(&ep, &["put", "leased", "v", "--lease", &id]);
    etcdctl(&ep, &["compaction", "300"]);
    let file = dir.path().join("etcd.db");
    let file = file.to_str().expect("utf-8");
    etcdctl(&ep, &["snapshot", "save", file]);
    for format in ["json", "simple", "table"] {
        assert_eq!(
            metastore(&["snapshot", "status", file, "-w", format]),
            etcdctl(&ep, &["snapshot", "status", file, "-w", format]),
            "{format}"
        );
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args([
            "snapshot",
            "status",
            dir.path().join("nope").to_str().expect("utf-8"),
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success());
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcdctl_snapshot_of_metastore_restores_into_etcd() {
    let server = TestServer::start().await;
    let ep = server.endpoint();
    let mut client = server.client().await;
    for i in 0..300 {
        client
            .put(format!("key/{i:03}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    for i in 0..100 {
        client
            .put(format!("key/{i:03}"), format!("w{i}"), None)
            .await
            .expect("overwrite");
    }
    client.delete("key/299", None).await.expect("delete");
    let lease = client.lease_grant(600, None).await.expect("grant").id();
    client
        .put(
            "leased",
            "x",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("leased put");
    client.compact(150, None).await.expect("compact");
    let big = "z".repeat(100_000);
    client
        .put("big", big.as_str(), None)
        .await
        .expect("big put");

    // Writes go on while the snapshot is taken.
    let writer = {
        let mut c = client.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                c.put(format!("live/{i:03}"), "l", None)
                    .await
                    .expect("live put");
            }
        })
    };
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().expect("utf-8").to_string();
    let ep2 = ep.clone();
    let saved =
        tokio::task::spawn_blocking(move || etcdctl(&ep2, &["snapshot", "save", &file_arg]))
            .await
            .expect("save");
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    writer.await.expect("writer");

    let status = json(&etcdctl(
        &ep,
        &[
            "snapshot",
            "status",
            file.to_str().expect("utf-8"),
            "-w",
            "json",
        ],
    ));
    // Our reading of the file is etcdctl's.
    assert_eq!(
        json(&metastore(&[
            "snapshot",
            "status",
            file.to_str().expect("utf-8"),
            "-w",
            "json"
        ])),
        status
    );
    let revision = status["revision"].as_i64().expect("revision");
    assert!(revision >= 403, "{status}");
    assert!(status["totalKey"].as_i64().expect("keys") > 300, "{status}");

    // Restore with etcd's tool, start etcd on it.
    let peer = format!("http://127.0.0.1:{}", free_port());
    let restored = dir.path().join("restored");
    etcd_restore(&file, &restored, "r", &peer);
    let (_etcd, etcd_ep) = Process::etcd_named(&restored, "r", &peer);

    // The same keys, values and revisions as MetaStore at the snapshot's revision.
    let ours = contents(&ep, revision);
    let theirs = contents(&etcd_ep, 0);
    assert_eq!(theirs.len(), ours.len());
    assert_eq!(theirs, ours);
    assert!(theirs
        .iter()
        .any(|(k, v, ..)| k == "big" && v.len() == 100_000));
    // History kept after the compaction is there too, and the compaction itself.
    assert_eq!(contents(&etcd_ep, 200), contents(&ep, 200));
    let compacted = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            etcd_ep.trim_start_matches("http://"),
            "get",
            "key/000",
            "--rev=100",
        ])
        .output()
        .expect("get");
    assert!(
        String::from_utf8_lossy(&compacted.stderr).contains("required revision has been compacted"),
        "{compacted:?}"
    );
    // The lease and its key.
    let leases = etcdctl(&etcd_ep, &["lease", "list"]);
    assert!(leases.contains(&format!("{lease:x}")), "{leases}");
    let ttl = etcdctl(
        &etcd_ep,
        &["lease", "timetolive", &format!("{lease:x}"), "--keys"],
    );
    assert!(ttl.contains("leased"), "{ttl}");
}

/// `metastore` with these arguments; (success, stdout, stderr).
fn metastore_output(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args(args)
        .output()
        .expect("run metastore");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--storage` as the suite runs (METASTORE_TEST_STORAGE), for the restore and the server.
fn storage() -> String {
    std::env::var("METASTORE_TEST_STORAGE").unwrap_or_else(|_| "memory".into())
}

/// A MetaStore server on `data_dir` with the flags `metastore snapshot restore` was given.
fn start_metastore(data_dir: &std::path::Path, client_port: u16, peer: &str) -> (Process, String) {
    let ep = format!("http://127.0.0.1:{client_port}");
    let log = std::fs::File::create(data_dir.with_extension("log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args([
            "--name",
            "m",
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
        ])
        .args(["--storage", &storage()])
        .args(["--listen-client-urls", &ep, "--advertise-client-urls", &ep])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("m={peer}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start metastore");
    let process = Process(child);
    wait_healthy(&ep);
    (process, ep)
}

fn hashkv(ep: &str) -> String {
    let out = etcdctl(ep, &["endpoint", "hashkv", "-w", "json"]);
    json(&out)[0]["HashKV"]["hash"].to_string()
}

#[test]
fn an_etcd_snapshot_restores_into_metastore_and_goes_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let (etcd, ep) = Process::etcd(&dir.path().join("etcd"));
    for i in 0..300 {
        etcdctl(&ep, &["put", &format!("key/{i:03}"), &format!("v{i}")]);
    }
    for i in 0..100 {
        etcdctl(&ep, &["put", &format!("key/{i:03}"), &format!("w{i}")]);
    }
    for i in (250..300).step_by(5) {
        etcdctl(&ep, &["del", &format!("key/{i:03}")]);
    }
    let lease = etcdctl(&ep, &["lease", "grant", "600"]);
    let lease = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    etcdctl(&ep, &["put", "leased/a", "x", "--lease", &lease]);
    etcdctl(&ep, &["put", "leased/b", "y", "--lease", &lease]);
    etcdctl(&ep, &["compaction", "200"]);
    etcdctl(&ep, &["put", "big", &"z".repeat(100_000)]);
    etcdctl(&ep, &["user", "add", "alice", "--new-user-password=secret"]);
    etcdctl(&ep, &["role", "add", "readers"]);
    etcdctl(&ep, &["user", "grant-role", "alice", "readers"]);
    let file = dir.path().join("etcd.db");
    let file_arg = file.to_str().expect("utf-8");
    etcdctl(&ep, &["snapshot", "save", file_arg]);

    let peer = format!("http://127.0.0.1:{}", free_port());
    let restored = dir.path().join("restored");
    let restore_args = |data_dir: &std::path::Path, file: &str| -> Vec<String> {
        [
            "snapshot",
            "restore",
            file,
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--name",
            "m",
            "--initial-cluster",
            &format!("m={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
            "--storage",
            &storage(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = restore_args(&restored, file_arg);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = metastore_output(&args);
    assert!(ok, "restore: {out}{err}");
    assert!(out.contains("1 user(s) and 1 role(s)"), "{out}");
    // A data dir is never restored over.
    let (ok, _, err) = metastore_output(&args);
    assert!(!ok);
    assert!(err.contains("not empty"), "{err}");

    let (mut server, ms) = start_metastore(&restored, free_port(), &peer);
    let compare = |ms: &str| {
        // The same keys, values, create/mod revisions and leases, now and in the history
        // kept after the compaction; the same compaction point; the same revision.
        assert_eq!(contents(ms, 0), contents(&ep, 0));
        assert_eq!(contents(ms, 260), contents(&ep, 260));
        assert_eq!(contents(ms, 201), contents(&ep, 201));
        let below = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                ms.trim_start_matches("http://"),
                "get",
                "key/000",
                "--rev=150",
            ])
            .output()
            .expect("get");
        assert!(
            String::from_utf8_lossy(&below.stderr).contains("required revision has been compacted"),
            "{below:?}"
        );
        let header = |e: &str| {
            json(&etcdctl(e, &["get", "nothing", "-w", "json"]))["header"]["revision"].clone()
        };
        assert_eq!(header(ms), header(&ep));
        // etcd's HashKV over the same history gives the same hash.
        assert_eq!(hashkv(ms), hashkv(&ep));
        let ttl = etcdctl(ms, &["lease", "timetolive", &lease, "--keys"]);
        assert!(
            ttl.contains("leased/a") && ttl.contains("leased/b"),
            "{ttl}"
        );
    };
    compare(&ms);
    // The restored state is the member's own: it survives a restart.
    drop(server);
    let (restarted, ms) = start_metastore(&restored, free_port(), &peer);
    server = restarted;
    compare(&ms);

    // And back: a write in MetaStore, a snapshot, etcd's restore; the users come back too.
    etcdctl(&ms, &["put", "written/in/metastore", "1"]);
    let back = dir.path().join("back.db");
    etcdctl(&ms, &["snapshot", "save", back.to_str().expect("utf-8")]);
    drop(server);
    drop(etcd);
    let etcd_peer = format!("http://127.0.0.1:{}", free_port());
    let etcd_dir = dir.path().join("etcd-again");
    etcd_restore(&back, &etcd_dir, "e", &etcd_peer);
    let (_etcd, etcd_ep) = Process::etcd_named(&etcd_dir, "e", &etcd_peer);
    let got = contents(&etcd_ep, 0);
    assert!(
        got.iter().any(|(k, ..)| k == "written/in/metastore"),
        "{got:?}"
    );
    assert!(etcdctl(&etcd_ep, &["user", "get", "alice"]).contains("readers"));
    assert!(etcdctl(&etcd_ep, &["role", "list"]).contains("readers"));
}

#[test]
fn restore_refuses_a_file_whose_hash_is_missing_or_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_etcd, ep) = Process::etcd(&dir.path().join("etcd"));
    etcdctl(&ep, &["put", "k", "v"]);
    let file = dir.path().join("etcd.db");
    etcdctl(&ep, &["snapshot", "save", file.to_str().expect("utf-8")]);
    let bytes = std::fs::read(&file).expect("read");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let restore = |file: &std::path::Path, data_dir: &str, extra: &[&str]| {
        let data_dir = dir.path().join(data_dir);
        let mut args = vec![
            "snapshot".to_string(),
            "restore".into(),
            file.to_str().expect("utf-8").into(),
            "--data-dir".into(),
            data_dir.to_str().expect("utf-8").into(),
            "--name".into(),
            "m".into(),
            "--initial-cluster".into(),
            format!("m={peer}"),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--storage".into(),
            storage(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = metastore_output(&args);
        (result, data_dir)
    };
    // No hash (a backend copied from a data dir): refused unless told to skip the check.
    let no_hash = dir.path().join("no-hash.db");
    std::fs::write(&no_hash, &bytes[..bytes.len() - 32]).expect("write");
    let ((ok, _, err), data_dir) = restore(&no_hash, "a", &[]);
    assert!(!ok);
    assert!(
        err.contains("snapshot missing hash but --skip-hash-check=false"),
        "{err}"
    );
    assert!(!data_dir.join("member").exists());
    let ((ok, out, err), _) = restore(&no_hash, "b", &["--skip-hash-check"]);
    assert!(ok, "{out}{err}");
    // One byte changed: the hash does not match.
    let mut damaged = bytes.clone();
    damaged[5000] ^= 0xff;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &damaged).expect("write");
    let ((ok, _, err), data_dir) = restore(&bad, "c", &[]);
    assert!(!ok);
    assert!(err.contains("expected sha256"), "{err}");
    assert!(!data_dir.join("member").exists());
    // --bump-revision needs --mark-compacted, as etcdutl says.
    let ((ok, _, err), _) = restore(&file, "d", &["--bump-revision", "1000"]);
    assert!(!ok);
    assert!(err.contains("--mark-compacted required"), "{err}");
    // Bumped and marked compacted: the revision moved on, and nothing before it is served.
    let ((ok, out, err), data_dir) =
        restore(&file, "e", &["--bump-revision", "1000", "--mark-compacted"]);
    assert!(ok, "{out}{err}");
    let (_server, ms) = start_metastore(&data_dir, free_port(), &peer);
    let header = json(&etcdctl(&ms, &["get", "k", "-w", "json"]));
    assert_eq!(
        header["header"]["revision"].as_i64(),
        Some(1002),
        "{header}"
    );
    assert_eq!(
        header["kvs"][0]["mod_revision"].as_i64(),
        Some(2),
        "{header}"
    );
    let old = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            ms.trim_start_matches("http://"),
            "get",
            "k",
            "--rev=1001",
        ])
        .output()
        .expect("get");
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"),
        "{old:?}"
    );
}
