//! Backups in etcd's format, read by etcd's own tools: `etcdctl snapshot save` against
//! MetaStore (while writes go on), `etcdctl snapshot status` and `snapshot restore` on the
//! file (bbolt reads it), and a real etcd started on the restored data dir serves the same
//! keys, values, revisions and leases.

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

struct Etcd(Child);

impl Drop for Etcd {
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
    let revision = status["revision"].as_i64().expect("revision");
    assert!(revision >= 403, "{status}");
    assert!(status["totalKey"].as_i64().expect("keys") > 300, "{status}");

    // Restore with etcd's tool, start etcd on it.
    let (client_port, peer_port) = (free_port(), free_port());
    let etcd_ep = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let restored = dir.path().join("restored");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", file.to_str().expect("utf-8")])
        .args(["--data-dir", restored.to_str().expect("utf-8")])
        .args(["--name", "r", "--initial-cluster", &format!("r={peer}")])
        .args(["--initial-advertise-peer-urls", &peer])
        .output()
        .expect("restore");
    assert!(out.status.success(), "restore: {out:?}");
    let _etcd = Etcd(
        Command::new("etcd")
            .args([
                "--name",
                "r",
                "--data-dir",
                restored.to_str().expect("utf-8"),
            ])
            .args([
                "--listen-client-urls",
                &etcd_ep,
                "--advertise-client-urls",
                &etcd_ep,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("r={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server)"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                etcd_ep.trim_start_matches("http://"),
                "endpoint",
                "health",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "restored etcd did not start");
        std::thread::sleep(Duration::from_millis(200));
    }

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
