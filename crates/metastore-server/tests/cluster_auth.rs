//! Auth across members: a JWT signed by one member is accepted by another (one that holds only
//! the public key and cannot sign), survives a restart of the member that signed it, and
//! turns stale when the auth store changes; a simple token is known to every member.

mod cluster_harness;

use cluster_harness::Cluster;
use rcgen::KeyPair;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// POST to a member's JSON gateway with an optional token: (HTTP status, body).
fn post(endpoint: &str, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
        .args(["-X", "POST", &format!("{endpoint}{path}"), "-d", body]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: {t}")]);
    }
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status.parse().unwrap_or(0), json)
}

fn token(endpoint: &str, user: &str, password: &str) -> Result<String, Value> {
    let (status, body) = post(
        endpoint,
        "/v3/auth/authenticate",
        &format!(r#"{{"name":"{user}","password":"{password}"}}"#),
        None,
    );
    match (status, body["token"].as_str()) {
        (200, Some(t)) => Ok(t.to_string()),
        _ => Err(body),
    }
}

/// Sets up root and alice (readwrite on `app/`), then turns auth on, through member 0.
fn secure(cluster: &Cluster) {
    for step in [
        vec!["user", "add", "root:rootpw"],
        vec!["role", "add", "root"],
        vec!["user", "grant-role", "root", "root"],
        vec!["user", "add", "alice:alicepw"],
        vec!["role", "add", "app"],
        vec![
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "app/",
            "--prefix=true",
        ],
        vec!["user", "grant-role", "alice", "app"],
        vec!["auth", "enable"],
    ] {
        let (ok, out) = cluster.etcdctl(&[0], &step);
        assert!(ok, "{step:?}: {out}");
    }
}

const PUT_APP: &str = r#"{"key":"YXBwLzE=","value":"dg=="}"#; // app/1 = v

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_from_one_member_is_checked_by_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = KeyPair::generate().expect("ES256 key");
    let private = dir.path().join("jwt.key");
    let public = dir.path().join("jwt.pub");
    std::fs::write(&private, key.serialize_pem()).expect("write key");
    std::fs::write(&public, key.public_key_pem()).expect("write key");
    let signing = format!(
        "jwt,sign-method=ES256,pub-key={},priv-key={},ttl=10m",
        public.display(),
        private.display()
    );
    let verify_only = format!("jwt,sign-method=ES256,pub-key={}", public.display());
    let mut cluster = Cluster::create(3);
    // Members 0 and 1 sign; member 2 only checks.
    let ic = cluster.initial_cluster.clone();
    cluster.spawn_with(0, &ic, &["--auth-token", &signing]);
    cluster.spawn_with(1, &ic, &["--auth-token", &signing]);
    cluster.spawn_with(2, &ic, &["--auth-token", &verify_only]);
    cluster.leader(Duration::from_secs(30)).await;
    secure(&cluster);
    let (e0, e2) = (cluster.endpoint(0), cluster.endpoint(2));

    let jwt = token(&e0, "alice", "alicepw").expect("alice's JWT");
    assert_eq!(jwt.split('.').count(), 3, "not a JWT: {jwt}");
    let (status, body) = post(&e2, "/v3/kv/put", PUT_APP, Some(&jwt));
    assert_eq!(status, 200, "member 2 refused member 0's JWT: {body}");
    let (status, body) = post(
        &e2,
        "/v3/kv/put",
        r#"{"key":"b3RoZXI=","value":"dg=="}"#,
        Some(&jwt),
    );
    assert_eq!(
        (status, body["message"].as_str()),
        (403, Some("etcdserver: permission denied"))
    );
    let tampered = format!("{}x", &jwt[..jwt.len() - 1]);
    let (status, body) = post(&e2, "/v3/kv/put", PUT_APP, Some(&tampered));
    assert_eq!(
        body["message"], "etcdserver: invalid auth token",
        "{status}"
    );
    let refused = token(&e2, "alice", "alicepw").expect_err("a verify-only member signed");
    assert_eq!(
        refused["message"],
        "auth: token signing attempted with verify-only key"
    );

    // JWTs live in the client, not in the member: the signer's restart changes nothing.
    cluster.kill9(0);
    cluster.spawn_with(0, &ic, &["--auth-token", &signing]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post(&e0, "/v3/kv/put", PUT_APP, Some(&jwt));
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "JWT refused after restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Any auth change makes every JWT signed before it stale, on every member.
    let (ok, out) = cluster.etcdctl(&[1], &["--user=root:rootpw", "role", "add", "later"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = post(&e2, "/v3/kv/put", PUT_APP, Some(&jwt));
        if body["message"] == "etcdserver: revision of auth store is old" {
            break;
        }
        assert!(Instant::now() < deadline, "a stale JWT still works: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fresh = token(&e0, "alice", "alicepw").expect("a new JWT");
    assert_eq!(post(&e2, "/v3/kv/put", PUT_APP, Some(&fresh)).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_token_is_known_to_every_member() {
    let cluster = Cluster::start(3);
    cluster.leader(Duration::from_secs(30)).await;
    secure(&cluster);
    let simple = token(&cluster.endpoint(0), "alice", "alicepw").expect("a simple token");
    assert_eq!(simple.split('.').count(), 2, "not a simple token: {simple}");
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = post(&cluster.endpoint(i), "/v3/kv/put", PUT_APP, Some(&simple));
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "member {i}: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
