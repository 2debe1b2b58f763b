//! The JSON gateway, compared with etcd's: the same curl requests go to a real etcd (Debian's
//! `etcd`) and to MetaStore, and the answers must match field by field once the values that
//! differ by nature (ids, terms, URLs, lease ids, sizes) are masked.

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

/// A real etcd on loopback, killed on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tmp");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "gw", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("gw={peer_url}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server; scripts/setup.sh installs it)");
        let etcd = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while post(&etcd.endpoint, "/v3/maintenance/status", "{}").0 != 200 {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST with curl: (status, body).
fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    curl(&["-X", "POST", &format!("{base}{path}"), "-d", body])
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.parse().unwrap_or(0), body.to_string())
}

/// Masks what differs between any two servers: member and cluster ids, terms, lease ids, URLs,
/// sizes and versions.
fn mask(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "cluster_id" | "member_id" | "raft_term" | "ID" | "leader" | "raftTerm"
                    | "raftIndex" | "raftAppliedIndex" | "dbSize" | "dbSizeInUse" | "version"
                    | "peerURLs" | "clientURLs" | "name" => *v = Value::String("*".into()),
                    _ => mask(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask),
        _ => {}
    }
}

fn masked(body: &str) -> Value {
    let mut v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    mask(&mut v);
    v
}

/// The same request to both; the answers must agree (status and masked body).
fn same(etcd: &str, ours: &str, path: &str, body: &str) -> Value {
    let (es, eb) = post(etcd, path, body);
    let (os, ob) = post(ours, path, body);
    assert_eq!(os, es, "{path} {body}: status\netcd: {eb}\nours: {ob}");
    let (e, o) = (masked(&eb), masked(&ob));
    assert_eq!(o, e, "{path} {body}\netcd: {eb}\nours: {ob}");
    serde_json::from_str(&ob).expect("json")
}

/// Error answers: same HTTP status, gRPC code and message.
fn same_error(etcd: &str, ours: &str, path: &str, body: &str) {
    let (es, eb) = post(etcd, path, body);
    let (os, ob) = post(ours, path, body);
    assert_eq!(os, es, "{path} {body}\netcd: {eb}\nours: {ob}");
    let (e, o): (Value, Value) = (
        serde_json::from_str(&eb).expect("etcd json"),
        serde_json::from_str(&ob).expect("our json"),
    );
    for field in ["error", "code", "message"] {
        assert_eq!(o[field], e[field], "{field} of {path} {body}");
    }
    // grpc-gateway's field order: error, message, code.
    assert!(ob.starts_with("{\"error\":"), "{ob}");
}

/// The first `n` lines of a stream, read for at most `secs` seconds.
fn stream_lines(base: &str, path: &str, body: &str, secs: &str) -> Vec<Value> {
    let out = Command::new("curl")
        .args(["-s", "-N", "--max-time", secs, "-X", "POST"])
        .arg(format!("{base}{path}"))
        .args(["-d", body])
        .output()
        .expect("curl");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(masked)
        .collect()
}

const B64_FOO: &str = "Zm9v"; // "foo"

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_as_etcds() {
    let etcd = Etcd::start();
    let server = TestServer::start().await;
    let (e, o) = (etcd.endpoint.as_str(), server.endpoint());
    let o = o.as_str();

    same(
        e,
        o,
        "/v3/kv/put",
        &format!(r#"{{"key":"{B64_FOO}","value":"YmFy"}}"#),
    );
    same(e, o, "/v3/kv/range", &format!(r#"{{"key":"{B64_FOO}"}}"#));
    for k in ["YQ==", "Yg==", "Yw=="] {
        same(
            e,
            o,
            "/v3/kv/put",
            &format!(r#"{{"key":"{k}","value":"dg==","prev_kv":true}}"#),
        );
    }
    // Prefix "a".."d", sorted descending, limited, keys only.
    same(
        e,
        o,
        "/v3/kv/range",
        r#"{"key":"YQ==","range_end":"ZA==","limit":"2","sort_order":"DESCEND","sort_target":"KEY","keys_only":true}"#,
    );
    same(
        e,
        o,
        "/v3/kv/range",
        r#"{"key":"YQ==","range_end":"ZA==","count_only":true}"#,
    );
    // An empty body is the default request.
    same_error(e, o, "/v3/kv/range", "");
    same(
        e,
        o,
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"eA==","create_revision":"0"}],"success":[{"request_put":{"key":"eA==","value":"MQ=="}}],"failure":[{"request_range":{"key":"eA=="}}]}"#,
    );
    same(
        e,
        o,
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"eA==","result":"EQUAL","create_revision":"0"}],"success":[{"request_put":{"key":"eA==","value":"Mg=="}}],"failure":[{"request_range":{"key":"eA=="}}]}"#,
    );
    same(
        e,
        o,
        "/v3/kv/deleterange",
        r#"{"key":"YQ==","prev_kv":true}"#,
    );
    same(
        e,
        o,
        "/v3/kv/put",
        &format!(r#"{{"key":"{B64_FOO}","value":"YmF6"}}"#),
    );
    same(e, o, "/v3/kv/compaction", r#"{"revision":"3"}"#);
    same_error(
        e,
        o,
        "/v3/kv/range",
        &format!(r#"{{"key":"{B64_FOO}","revision":"2"}}"#),
    );
    same_error(e, o, "/v3/kv/compaction", r#"{"revision":"2"}"#);
    same_error(
        e,
        o,
        "/v3/kv/put",
        &format!(r#"{{"key":"{B64_FOO}","value":"dg==","lease":"99"}}"#),
    );
    same_error(e, o, "/v3/kv/put", r#"{"value":"dg=="}"#);
    // The v3beta prefix etcd keeps for older clients.
    same(
        e,
        o,
        "/v3beta/kv/range",
        &format!(r#"{{"key":"{B64_FOO}"}}"#),
    );

    // Leases: ids differ, the rest must not.
    let grant = same(e, o, "/v3/lease/grant", r#"{"TTL":"60"}"#);
    let ours_id = grant["ID"].as_str().expect("lease id").to_string();
    let etcd_grant: Value =
        serde_json::from_str(&post(e, "/v3/lease/grant", r#"{"TTL":"60"}"#).1).expect("json");
    let etcd_id = etcd_grant["ID"].as_str().expect("lease id").to_string();
    for (base, id) in [(e, &etcd_id), (o, &ours_id)] {
        let (status, _) = post(
            base,
            "/v3/kv/put",
            &format!(r#"{{"key":"bA==","value":"dg==","lease":"{id}"}}"#),
        );
        assert_eq!(status, 200);
    }
    let ttl = |base: &str, id: &str| {
        let (_, body) = post(
            base,
            "/v3/lease/timetolive",
            &format!(r#"{{"ID":"{id}","keys":true}}"#),
        );
        let mut v = masked(&body);
        // The remaining TTL depends on when each was granted.
        v["TTL"] = Value::Null;
        v
    };
    assert_eq!(ttl(o, &ours_id), ttl(e, &etcd_id));
    let keepalive = |base: &str, id: &str| {
        stream_lines(
            base,
            "/v3/lease/keepalive",
            &format!(r#"{{"ID":"{id}"}}"#),
            "1",
        )
    };
    let (ek, ok) = (keepalive(e, &etcd_id), keepalive(o, &ours_id));
    assert!(!ek.is_empty());
    assert_eq!(ok.first(), ek.first());
    for (base, id) in [(e, &etcd_id), (o, &ours_id)] {
        let (status, body) = post(base, "/v3/lease/revoke", &format!(r#"{{"ID":"{id}"}}"#));
        assert_eq!(status, 200, "{body}");
    }
    same_error(e, o, "/v3/lease/revoke", r#"{"ID":"12345"}"#);

    // Watch: the created line, then the history from revision 2 (a stream of result lines).
    let watch = r#"{"create_request":{"key":"Zm9v","start_revision":"4"}}"#;
    let (ew, ow) = (
        stream_lines(e, "/v3/watch", watch, "1"),
        stream_lines(o, "/v3/watch", watch, "1"),
    );
    assert!(ew.len() >= 2, "{ew:?}");
    assert_eq!(ow, ew);

    same(e, o, "/v3/cluster/member/list", "{}");
    // Status: the same fields (values differ by nature: versions, sizes, indexes).
    let keys = |body: String| -> Vec<String> {
        let v: Value = serde_json::from_str(&body).expect("json");
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    let (es, eb) = post(e, "/v3/maintenance/status", "{}");
    let (os, ob) = post(o, "/v3/maintenance/status", "{}");
    assert_eq!((os, keys(ob)), (es, keys(eb)));

    // A malformed body is a 400 with code 3 (the decoder's message differs by language).
    let (es, eb) = post(e, "/v3/kv/range", r#"{"key":1}"#);
    let (os, ob) = post(o, "/v3/kv/range", r#"{"key":1}"#);
    assert_eq!((os, es), (400, 400));
    assert_eq!(masked(&ob)["code"], masked(&eb)["code"]);

    // CORS, etcd's default `*`: preflight and headers on answers.
    let headers = |base: &str, method: &str| {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "-X", method])
            .arg(format!("{base}/v3/kv/range"))
            .args(["-H", "Origin: http://example.com", "-d", "{}"])
            .output()
            .expect("curl");
        let text = String::from_utf8(out.stdout)
            .expect("utf-8")
            .to_ascii_lowercase();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("access-control-") || l.starts_with("http/1.1"))
            .map(|l| l.trim().to_string())
            .collect();
        lines.sort();
        lines
    };
    for method in ["OPTIONS", "POST"] {
        assert_eq!(headers(o, method), headers(e, method), "{method}");
    }
}

/// POST with a token in the `Authorization` header, as etcd's gateway clients send it.
fn post_as(base: &str, path: &str, body: &str, token: &str) -> (u16, String) {
    curl(&[
        "-X",
        "POST",
        &format!("{base}{path}"),
        "-H",
        &format!("Authorization: {token}"),
        "-d",
        body,
    ])
}

/// The same authenticated request to both (each with its own token); answers must agree.
fn same_as(etcd: (&str, &str), ours: (&str, &str), path: &str, body: &str) -> (u16, Value) {
    let (es, eb) = post_as(etcd.0, path, body, etcd.1);
    let (os, ob) = post_as(ours.0, path, body, ours.1);
    assert_eq!(os, es, "{path} {body}: status\netcd: {eb}\nours: {ob}");
    let (e, o) = (masked(&eb), masked(&ob));
    assert_eq!(o, e, "{path} {body}\netcd: {eb}\nours: {ob}");
    (os, o)
}

fn token_of(base: &str, user: &str, password: &str) -> String {
    let body = format!(r#"{{"name":"{user}","password":"{password}"}}"#);
    let (status, text) = post(base, "/v3/auth/authenticate", &body);
    assert_eq!(status, 200, "authenticate {user}: {text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    v["token"].as_str().expect("a token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_authenticates_as_etcds() {
    let etcd = Etcd::start();
    let server = TestServer::start().await;
    let (e, o) = (etcd.endpoint.as_str(), server.endpoint());
    let o = o.as_str();
    // "app/" and "app0" in base64: alice may read and write app/*.
    for (path, body) in [
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"rootpw"}"#,
        ),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        (
            "/v3/auth/user/add",
            r#"{"name":"alice","password":"alicepw"}"#,
        ),
        ("/v3/auth/role/add", r#"{"name":"app"}"#),
        (
            "/v3/auth/role/grant",
            r#"{"name":"app","perm":{"permType":"READWRITE","key":"YXBwLw==","range_end":"YXBwMA=="}}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"alice","role":"app"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        same(e, o, path, body);
    }
    // Anonymous, a wrong password, a token nobody issued.
    same_error(e, o, "/v3/kv/put", r#"{"key":"YXBwLzE=","value":"dg=="}"#);
    same_error(
        e,
        o,
        "/v3/auth/authenticate",
        r#"{"name":"alice","password":"wrong"}"#,
    );
    let (es, eb) = post_as(e, "/v3/kv/range", r#"{"key":"YXBwLzE="}"#, "forged.1");
    let (os, ob) = post_as(o, "/v3/kv/range", r#"{"key":"YXBwLzE="}"#, "forged.1");
    assert_eq!((os, masked(&ob)), (es, masked(&eb)), "forged token");

    let alice = (
        token_of(e, "alice", "alicepw"),
        token_of(o, "alice", "alicepw"),
    );
    let (ea, oa) = ((e, alice.0.as_str()), (o, alice.1.as_str()));
    same_as(ea, oa, "/v3/kv/put", r#"{"key":"YXBwLzE=","value":"dg=="}"#);
    same_as(ea, oa, "/v3/kv/range", r#"{"key":"YXBwLzE="}"#);
    let (status, denied) = same_as(ea, oa, "/v3/kv/put", r#"{"key":"b3RoZXI=","value":"dg=="}"#);
    assert_eq!(status, 403, "{denied}");
    assert_eq!(denied["message"], "etcdserver: permission denied");
    same_as(ea, oa, "/v3/auth/user/list", "{}");
    // "Bearer <token>" is read too, as etcd 3.5 strips the prefix (Debian's etcd 3.4 does
    // not, so this one is checked on MetaStore alone).
    let plain = post_as(o, "/v3/kv/range", r#"{"key":"YXBwLzE="}"#, &alice.1);
    let bearer = post_as(
        o,
        "/v3/kv/range",
        r#"{"key":"YXBwLzE="}"#,
        &format!("Bearer {}", alice.1),
    );
    assert_eq!((bearer.0, masked(&bearer.1)), (plain.0, masked(&plain.1)));
    assert_eq!(bearer.0, 200, "{}", bearer.1);
    let root = (token_of(e, "root", "rootpw"), token_of(o, "root", "rootpw"));
    same_as((e, &root.0), (o, &root.1), "/v3/auth/disable", "{}");
    same(e, o, "/v3/kv/range", r#"{"key":"YXBwLzE="}"#);
}
