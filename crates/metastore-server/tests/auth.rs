//! Auth as etcd's clients meet it: the same `etcdctl` session (users, roles, permissions,
//! `auth enable`, denied cases, root's protections, a permission revoked) run against
//! Debian's etcd and against MetaStore gives the same answers line for line; tokens with the
//! `etcd-client` crate (a token after a restart, after a password change, a watch refused);
//! and the clear password is in no file of the data dir and no log line.

mod common;

use common::TestServer;
use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT_PW: &str = "root-Secret-8f3a";
const ALICE_PW: &str = "alice-Secret-2c9d";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// What etcdctl answered: success, stdout, and its `Error: ...` line (the retry
/// interceptor's JSON log lines before it carry timestamps and random ids).
fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint.trim_start_matches("http://")])
        .args(["--command-timeout", "20s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .collect::<Vec<_>>()
        .join("\n");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        error,
    )
}

struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd(dir: &Path) -> (Etcd, String) {
    let ep = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let etcd = Etcd(
        Command::new("etcd")
            .args(["--name", "e", "--data-dir", dir.to_str().expect("utf-8")])
            .args(["--listen-client-urls", &ep, "--advertise-client-urls", &ep])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server)"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&ep, &["endpoint", "health"]).0 {
        assert!(Instant::now() < deadline, "etcd at {ep} did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    (etcd, ep)
}

/// The session: setup, then every kind of refusal etcd has for a client.
fn session() -> Vec<Vec<String>> {
    let root = format!("--user=root:{ROOT_PW}");
    let alice = format!("--user=alice:{ALICE_PW}");
    let reader = "--user=reader:reader-pw".to_string();
    let add_root = format!("root:{ROOT_PW}");
    let add_alice = format!("alice:{ALICE_PW}");
    let steps: Vec<Vec<&str>> = vec![
        vec!["auth", "enable"],
        vec!["user", "add", &add_root],
        vec!["user", "add", &add_alice],
        vec!["user", "add", "reader:reader-pw"],
        vec!["user", "add", "alice:again"],
        vec!["role", "add", "app"],
        vec!["role", "add", "app"],
        vec!["role", "add", "ro"],
        vec![
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "/app/",
            "--prefix=true",
        ],
        vec!["role", "grant-permission", "app", "write", "/log"],
        vec![
            "role",
            "grant-permission",
            "ro",
            "read",
            "/app/",
            "--prefix=true",
        ],
        vec!["role", "grant-permission", "nosuch", "read", "/x"],
        vec!["user", "grant-role", "alice", "app"],
        vec!["user", "grant-role", "reader", "ro"],
        vec!["user", "grant-role", "alice", "nosuch"],
        vec!["user", "grant-role", "nobody", "app"],
        vec!["user", "revoke-role", "alice", "ro"],
        vec!["role", "revoke-permission", "app", "/nope"],
        vec!["role", "get", "app"],
        vec!["role", "list"],
        vec!["user", "list"],
        vec!["user", "get", "alice"],
        // etcdctl 3.4 adds the root role itself when AuthEnable says it is missing.
        vec!["auth", "enable"],
        vec!["put", "/app/a", "anonymous"],
        vec!["get", "/app/a"],
        vec![&alice, "put", "/app/a", "1"],
        vec![&alice, "get", "/app/a", "--print-value-only"],
        vec![&alice, "put", "/other", "1"],
        vec![&alice, "get", "/app/", "--prefix", "--keys-only"],
        vec![&alice, "get", "/", "--prefix"],
        vec![&alice, "put", "/log", "line"],
        vec![&alice, "get", "/log"],
        vec![&alice, "del", "/app/a", "--prev-kv"],
        vec![&alice, "put", "/app/b", "2"],
        vec!["--user=alice:wrong", "get", "/app/b"],
        vec!["--user=nobody:pw", "get", "/app/b"],
        vec![&reader, "get", "/app/b", "--print-value-only"],
        vec![&reader, "put", "/app/b", "3"],
        vec![&alice, "user", "list"],
        vec![&alice, "user", "get", "alice"],
        vec![&alice, "user", "get", "reader"],
        vec![&alice, "role", "get", "app"],
        vec![&alice, "role", "get", "ro"],
        vec![&alice, "user", "add", "mallory:pw"],
        vec![&alice, "auth", "disable"],
        vec![&root, "user", "delete", "root"],
        vec![&root, "user", "revoke-role", "root", "root"],
        vec![&root, "role", "delete", "root"],
        vec![&root, "get", "/app/b", "--print-value-only"],
        vec![
            &root,
            "role",
            "revoke-permission",
            "app",
            "/app/",
            "--prefix=true",
        ],
        vec![&alice, "put", "/app/c", "revoked"],
        vec![&root, "user", "passwd", "alice", "--interactive=false"],
        vec![&root, "user", "delete", "reader"],
        vec![&reader, "get", "/app/b"],
        vec![&root, "role", "delete", "ro"],
        vec![&root, "auth", "disable"],
        vec!["put", "/app/d", "open again"],
        vec!["get", "/app/", "--prefix"],
        vec!["user", "delete", "root"],
    ];
    steps
        .into_iter()
        .map(|s| s.into_iter().map(String::from).collect())
        .collect()
}

/// Runs the session, feeding `user passwd`'s new password on stdin.
fn run_session(endpoint: &str) -> Vec<(Vec<String>, (bool, String, String))> {
    session()
        .into_iter()
        .map(|args| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let answer = if args.iter().any(|a| a == "passwd") {
                let mut child = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", endpoint.trim_start_matches("http://")])
                    .args(&refs)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("run etcdctl");
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"alice-new-pw\n")
                    .expect("write password");
                let out = child.wait_with_output().expect("etcdctl");
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::new(),
                )
            } else {
                etcdctl(endpoint, &refs)
            };
            (args, answer)
        })
        .collect()
}

#[tokio::test]
async fn etcdctl_auth_session_answers_as_etcd_does() {
    let etcd_dir = tempfile::tempdir().expect("tempdir");
    let (etcd, etcd_ep) = start_etcd(etcd_dir.path());
    let expected = run_session(&etcd_ep);
    drop(etcd);

    let srv = TestServer::start().await;
    let got = run_session(&srv.endpoint());
    let mut diffs = Vec::new();
    for ((args, want), (_, have)) in expected.iter().zip(&got) {
        if want != have {
            diffs.push(format!(
                "etcdctl {args:?}\n  etcd:      {want:?}\n  metastore: {have:?}"
            ));
        }
    }
    assert!(diffs.is_empty(), "answers differ:\n{}", diffs.join("\n"));
    // The session must have exercised refusals, not only successes.
    let refusals: Vec<&str> = got.iter().map(|(_, a)| a.2.as_str()).collect();
    for text in [
        "Error: etcdserver: user name is empty",
        "Error: etcdserver: permission denied",
        "Error: etcdserver: authentication failed, invalid user ID or password",
        "Error: etcdserver: invalid auth management",
        "Error: etcdserver: role name not found",
        "Error: etcdserver: user name already exists",
        "Error: etcdserver: root user does not exist",
        "Error: etcdserver: permission is not granted to the role",
    ] {
        assert!(refusals.contains(&text), "no step answered {text:?}");
    }

    // The clear passwords are nowhere on disk and in no log line.
    let root = srv.data_dir().parent().expect("root").to_path_buf();
    for pw in [ROOT_PW, ALICE_PW, "alice-new-pw"] {
        let found = grep_dir(&root, pw.as_bytes());
        assert!(found.is_empty(), "password {pw:?} found in {found:?}");
    }
}

fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(grep_dir(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

async fn as_user(srv: &TestServer, user: &str, password: &str) -> Client {
    let opts = ConnectOptions::new()
        .with_user(user, password)
        .with_timeout(Duration::from_secs(30));
    Client::connect([srv.endpoint()], Some(opts))
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

fn message(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// root (root role) and alice (readwrite on `app/`), auth on.
async fn secured_server(extra: &[&str]) -> TestServer {
    let srv = TestServer::start_with_args(extra).await;
    let c = srv.client().await;
    let auth = c.auth_client();
    let mut auth = auth;
    auth.user_add("root", ROOT_PW, None)
        .await
        .expect("add root");
    auth.role_add("root").await.expect("root role");
    auth.user_grant_role("root", "root").await.expect("grant");
    auth.user_add("alice", ALICE_PW, None)
        .await
        .expect("add alice");
    auth.role_add("app").await.expect("app role");
    auth.role_grant_permission(
        "app",
        etcd_client::Permission::read_write("app/").with_prefix(),
    )
    .await
    .expect("grant app/");
    auth.user_grant_role("alice", "app")
        .await
        .expect("grant app");
    auth.auth_enable().await.expect("enable");
    srv
}

#[tokio::test]
async fn tokens_follow_permissions_passwords_and_restarts() {
    let mut srv = secured_server(&[]).await;
    let mut alice = as_user(&srv, "alice", ALICE_PW).await;
    alice
        .put("app/1", "v", None)
        .await
        .expect("alice writes app/");
    let denied = alice
        .put("other", "v", None)
        .await
        .expect_err("outside app/");
    assert_eq!(
        message(denied),
        "PermissionDenied: etcdserver: permission denied"
    );

    // A watch outside the grant is created and canceled at once, as etcd does.
    let mut stream = alice
        .watch("other", Some(WatchOptions::new()))
        .await
        .expect("watch call");
    let first = stream.message().await.expect("stream").expect("a response");
    assert!(first.created() && first.canceled(), "{first:?}");
    assert_eq!(
        first.cancel_reason(),
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );

    // A permission revoked while alice's token is in use stops her next request.
    let root = as_user(&srv, "root", ROOT_PW).await;
    root.auth_client()
        .role_revoke_permission(
            "app",
            "app/",
            Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
        )
        .await
        .expect("revoke");
    let denied = alice.put("app/2", "v", None).await.expect_err("revoked");
    assert_eq!(
        message(denied),
        "PermissionDenied: etcdserver: permission denied"
    );
    let denied = alice
        .get("app/1", Some(GetOptions::new().with_serializable()))
        .await
        .expect_err("revoked read");
    assert_eq!(
        message(denied),
        "PermissionDenied: etcdserver: permission denied"
    );

    // A changed password invalidates the user's tokens.
    root.auth_client()
        .user_change_password("alice", "alice-new-pw")
        .await
        .expect("passwd");
    let stale = alice.get("app/1", None).await.expect_err("old token");
    assert_eq!(
        message(stale),
        "Unauthenticated: etcdserver: invalid auth token"
    );
    assert!(
        Client::connect(
            [srv.endpoint()],
            Some(ConnectOptions::new().with_user("alice", ALICE_PW))
        )
        .await
        .is_err(),
        "the old password still authenticates"
    );

    // Simple tokens live in memory: after a restart a client authenticates again, and the
    // users, roles and auth state are still there.
    drop(root);
    srv.restart().await;
    let stale = alice
        .get("app/1", None)
        .await
        .expect_err("token from before");
    assert_eq!(
        message(stale),
        "Unauthenticated: etcdserver: invalid auth token"
    );
    let mut root = as_user(&srv, "root", ROOT_PW).await;
    let users = root.user_list().await.expect("users survive");
    assert_eq!(users.users(), ["alice", "root"]);
    let anonymous = srv
        .client()
        .await
        .get("app/1", None)
        .await
        .expect_err("anon");
    assert_eq!(
        message(anonymous),
        "InvalidArgument: etcdserver: user name is empty"
    );
    let mut alice = as_user(&srv, "alice", "alice-new-pw").await;
    let denied = alice
        .put("app/3", "v", None)
        .await
        .expect_err("still revoked");
    assert_eq!(
        message(denied),
        "PermissionDenied: etcdserver: permission denied"
    );
    root.put("app/3", "v", None)
        .await
        .expect("root writes anywhere");

    // A deleted user's token dies with it.
    root.auth_client()
        .user_delete("alice")
        .await
        .expect("delete");
    let gone = alice.get("app/3", None).await.expect_err("deleted user");
    assert_eq!(
        message(gone),
        "Unauthenticated: etcdserver: invalid auth token"
    );
}

#[tokio::test]
async fn admin_calls_need_the_root_role() {
    let srv = secured_server(&[]).await;
    let mut alice = as_user(&srv, "alice", ALICE_PW).await;
    let mut root = as_user(&srv, "root", ROOT_PW).await;
    let denied = "PermissionDenied: etcdserver: permission denied";
    assert_eq!(
        message(alice.compact(1, None).await.expect_err("compact")),
        denied
    );
    assert_eq!(message(alice.hash_kv(0).await.expect_err("hashkv")), denied);
    assert_eq!(
        message(alice.defragment().await.expect_err("defrag")),
        denied
    );
    assert_eq!(
        message(alice.auth_client().user_list().await.expect_err("list")),
        denied
    );
    assert_eq!(
        message(
            alice
                .alarm(
                    etcd_client::AlarmAction::Deactivate,
                    etcd_client::AlarmType::Nospace,
                    None
                )
                .await
                .expect_err("alarm")
        ),
        denied
    );
    // etcd 3.5 (since 3.5.x's hardening) wants some user for these, but no role.
    let empty = "InvalidArgument: etcdserver: user name is empty";
    let mut anon = srv.client().await;
    assert_eq!(message(anon.status().await.expect_err("status")), empty);
    assert_eq!(
        message(anon.member_list().await.expect_err("members")),
        empty
    );
    assert_eq!(
        message(anon.lease_grant(60, None).await.expect_err("grant")),
        empty
    );
    assert_eq!(
        message(
            anon.alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None
            )
            .await
            .expect_err("alarms")
        ),
        empty
    );
    alice.status().await.expect("status for any user");
    alice.member_list().await.expect("member list for any user");
    root.compact(1, None).await.expect("root compacts");
    root.hash_kv(0).await.expect("root hashes");
    // A lease with alice's keys is hers to renew, not a stranger's.
    let lease = alice.lease_grant(60, None).await.expect("grant").id();
    alice
        .put(
            "app/leased",
            "v",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("attach");
    alice
        .lease_time_to_live(lease, None)
        .await
        .expect("ttl of her own lease");
    assert_eq!(
        message(
            anon.lease_time_to_live(lease, None)
                .await
                .expect_err("anon ttl")
        ),
        "InvalidArgument: etcdserver: user name is empty"
    );
    root.lease_revoke(lease).await.expect("root revokes");
}
