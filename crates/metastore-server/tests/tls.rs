//! TLS as etcd's clients use it: `etcdctl --cacert --cert --key` against an `https://` client
//! URL; with `--trusted-ca-file` a client without a certificate (or with one from another CA)
//! is refused; with `--client-cert-auth` the certificate's common name is the user; the JSON
//! gateway and `/health` over the same TLS port; and a certificate replaced on disk is served
//! without a restart. Every certificate is made by the test (rcgen); no key is committed.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, common_name: &str, sans: &[&str]) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `metastore` as member `name` (data in `d/name`, log in `d/name.log`) serving `client` and
/// `peer` in a cluster of `initial`; the caller adds the TLS flags.
fn metastore(d: &Path, name: &str, client: &str, peer: &str, initial: &str) -> Command {
    let log = std::fs::File::create(d.join(format!("{name}.log"))).expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metastore"));
    cmd.args(["--name", name, "--data-dir"])
        .arg(d.join(name))
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", initial])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    cmd
}

fn etcdctl(endpoint: &str, tls: &[&str], args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", "3s"])
        .args(["--command-timeout", "10s"])
        .args(tls)
        .args(args)
        .output()
        .expect("run etcdctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn curl(url: &str, tls: &[&str], body: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10"]).args(tls);
    if let Some(body) = body {
        cmd.args(["-X", "POST", "-d", body]);
    }
    let out = cmd.arg(url).output().expect("curl");
    (out.status.success(), stdout(&out))
}

#[test]
fn etcdctl_over_tls_with_client_certificates_and_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = new_ca("metastore test CA");
    let other_ca = new_ca("somebody else's CA");
    let (server_cert, server_key) = leaf(&ca, "server", &["127.0.0.1", "localhost"]);
    let (root_cert, root_key) = leaf(&ca, "root", &[]);
    let (alice_cert, alice_key) = leaf(&ca, "alice", &[]);
    let (stranger_cert, stranger_key) = leaf(&other_ca, "root", &[]);
    let ca_file = write(d, "ca.pem", &ca.pem);
    let other_ca_file = write(d, "other-ca.pem", &other_ca.pem);
    let cert_file = write(d, "server.pem", &server_cert);
    let key_file = write(d, "server-key.pem", &server_key);
    let files = |name: &str, cert: &str, key: &str| {
        (
            write(d, &format!("{name}.pem"), cert),
            write(d, &format!("{name}-key.pem"), key),
        )
    };
    let (root_c, root_k) = files("root", &root_cert, &root_key);
    let (alice_c, alice_k) = files("alice", &alice_cert, &alice_key);
    let (stranger_c, stranger_k) = files("stranger", &stranger_cert, &stranger_key);

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let _server = Server(
        metastore(d, "t", &url, &peer, &format!("t={peer}"))
            .args(["--cert-file", cert_file.to_str().expect("utf-8")])
            .args(["--key-file", key_file.to_str().expect("utf-8")])
            .args(["--trusted-ca-file", ca_file.to_str().expect("utf-8")])
            .arg("--client-cert-auth")
            .spawn()
            .expect("start metastore"),
    );
    let ep = format!("127.0.0.1:{port}");
    let ca_s = ca_file.to_str().expect("utf-8");
    let as_root = [
        "--cacert",
        ca_s,
        "--cert",
        root_c.to_str().expect("utf-8"),
        "--key",
        root_k.to_str().expect("utf-8"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&ep, &as_root, &["endpoint", "health"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "metastore over TLS did not come up: {}",
            std::fs::read_to_string(d.join("t.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let put = etcdctl(&ep, &as_root, &["put", "k", "over tls"]);
    assert!(put.status.success(), "{}", stderr(&put));
    let get = etcdctl(&ep, &as_root, &["get", "k", "--print-value-only"]);
    assert_eq!(stdout(&get), "over tls\n");

    // --trusted-ca-file makes a client certificate mandatory, and from that CA.
    let no_cert = etcdctl(&ep, &["--cacert", ca_s], &["get", "k"]);
    assert!(
        !no_cert.status.success(),
        "a client without a certificate got in"
    );
    let stranger = [
        "--cacert",
        ca_s,
        "--cert",
        stranger_c.to_str().expect("utf-8"),
        "--key",
        stranger_k.to_str().expect("utf-8"),
    ];
    assert!(!etcdctl(&ep, &stranger, &["get", "k"]).status.success());
    // A client that does not trust the server's CA refuses the server.
    let wrong_ca = [
        "--cacert",
        other_ca_file.to_str().expect("utf-8"),
        "--cert",
        root_c.to_str().expect("utf-8"),
        "--key",
        root_k.to_str().expect("utf-8"),
    ];
    assert!(!etcdctl(&ep, &wrong_ca, &["get", "k"]).status.success());

    // --client-cert-auth: the certificate's common name is the user.
    let as_alice = [
        "--cacert",
        ca_s,
        "--cert",
        alice_c.to_str().expect("utf-8"),
        "--key",
        alice_k.to_str().expect("utf-8"),
    ];
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
        let out = etcdctl(&ep, &as_root, &step);
        assert!(out.status.success(), "{step:?}: {}", stderr(&out));
    }
    let out = etcdctl(&ep, &as_root, &["put", "k", "root by certificate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = etcdctl(&ep, &as_alice, &["put", "app/1", "alice by certificate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = etcdctl(&ep, &as_alice, &["put", "k", "not hers"]);
    assert!(
        stderr(&out).contains("Error: etcdserver: permission denied"),
        "{}",
        stderr(&out)
    );
    // A token wins over the certificate (etcd): alice's password makes her alice even with
    // root's certificate.
    let mut with_user = as_root.to_vec();
    with_user.push("--user=alice:alicepw");
    let out = etcdctl(&ep, &with_user, &["put", "k", "token wins"]);
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );

    // The gateway and the probes share the TLS port; the gateway never takes its caller's
    // certificate name (etcd ignores it there), so auth wants a token.
    let curl_tls = [
        "--cacert",
        ca_s,
        "--cert",
        root_c.to_str().expect("utf-8"),
        "--key",
        root_k.to_str().expect("utf-8"),
    ];
    let (ok, health) = curl(&format!("{url}/health"), &curl_tls, None);
    assert!(ok && health.contains("\"health\":\"true\""), "{health}");
    let (_, range) = curl(
        &format!("{url}/v3/kv/range"),
        &curl_tls,
        Some(r#"{"key":"aw=="}"#),
    );
    assert!(range.contains("user name is empty"), "{range}");

    // Rotation: a new certificate from a new CA, written over the old files, is served to new
    // connections without a restart.
    let new_ca = new_ca("rotated CA");
    let (new_cert, new_key) = leaf(&new_ca, "server", &["127.0.0.1", "localhost"]);
    let new_ca_file = write(d, "new-ca.pem", &new_ca.pem);
    std::fs::write(&key_file, new_key).expect("rotate key");
    std::fs::write(&cert_file, new_cert).expect("rotate cert");
    let trusts_new = [
        "--cacert",
        new_ca_file.to_str().expect("utf-8"),
        "--cert",
        root_c.to_str().expect("utf-8"),
        "--key",
        root_k.to_str().expect("utf-8"),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = etcdctl(&ep, &trusts_new, &["get", "k", "--print-value-only"]);
        if out.status.success() {
            assert_eq!(stdout(&out), "root by certificate\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        !etcdctl(&ep, &as_root, &["get", "k"]).status.success(),
        "the old certificate is still served"
    );
}

#[test]
fn a_tls_cluster_forwards_keep_alives_to_its_leader_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = new_ca("cluster CA");
    let (member_cert, member_key) = leaf(&ca, "member", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = leaf(&ca, "client", &[]);
    let ca_file = write(d, "ca.pem", &ca.pem);
    let cert_file = write(d, "member.pem", &member_cert);
    let key_file = write(d, "member-key.pem", &member_key);
    let client_c = write(d, "client.pem", &client_cert);
    let client_k = write(d, "client-key.pem", &client_key);
    let names = ["a", "b", "c"];
    let clients: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let peers: Vec<String> = names
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let initial = names
        .iter()
        .zip(&peers)
        .map(|(n, p)| format!("{n}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    let _members: Vec<Server> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let url = format!("https://127.0.0.1:{}", clients[i]);
            Server(
                metastore(d, name, &url, &peers[i], &initial)
                    .args(["--cert-file", cert_file.to_str().expect("utf-8")])
                    .args(["--key-file", key_file.to_str().expect("utf-8")])
                    .args(["--trusted-ca-file", ca_file.to_str().expect("utf-8")])
                    .spawn()
                    .expect("start metastore"),
            )
        })
        .collect();
    let tls = [
        "--cacert",
        ca_file.to_str().expect("utf-8"),
        "--cert",
        client_c.to_str().expect("utf-8"),
        "--key",
        client_k.to_str().expect("utf-8"),
    ];
    let endpoints: Vec<String> = clients.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for ep in &endpoints {
        while !etcdctl(ep, &tls, &["endpoint", "health"]).status.success() {
            assert!(Instant::now() < deadline, "{ep} did not come up");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let grant = etcdctl(&endpoints[0], &tls, &["lease", "grant", "60"]);
    assert!(grant.status.success(), "{}", stderr(&grant));
    let id = stdout(&grant)
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    // Two of the three are followers: their keep-alive goes to the leader's https:// URL.
    for ep in &endpoints {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = etcdctl(ep, &tls, &["lease", "keep-alive", "--once", &id]);
            if out.status.success() && stdout(&out).contains("keepalived with TTL(60)") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "keep-alive through {ep}: {} {}",
                stdout(&out),
                stderr(&out)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[test]
fn members_talk_over_tls_and_refuse_a_peer_certificate_with_another_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = new_ca("peer CA");
    let (member_cert, member_key) = leaf(&ca, "member", &["127.0.0.1", "localhost"]);
    let (intruder_cert, intruder_key) = leaf(&ca, "intruder", &[]);
    let ca_file = write(d, "ca.pem", &ca.pem);
    let cert_file = write(d, "member.pem", &member_cert);
    let key_file = write(d, "member-key.pem", &member_key);
    let intruder_c = write(d, "intruder.pem", &intruder_cert);
    let intruder_k = write(d, "intruder-key.pem", &intruder_key);
    let names = ["a", "b", "c"];
    let clients: Vec<String> = names
        .iter()
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let peers: Vec<String> = names
        .iter()
        .map(|_| format!("https://127.0.0.1:{}", free_port()))
        .collect();
    let initial = names
        .iter()
        .zip(&peers)
        .map(|(n, p)| format!("{n}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    let _members: Vec<Server> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Server(
                metastore(d, name, &clients[i], &peers[i], &initial)
                    .args(["--peer-cert-file", cert_file.to_str().expect("utf-8")])
                    .args(["--peer-key-file", key_file.to_str().expect("utf-8")])
                    .args(["--peer-trusted-ca-file", ca_file.to_str().expect("utf-8")])
                    .arg("--peer-client-cert-auth")
                    .args(["--peer-cert-allowed-cn", "member"])
                    .spawn()
                    .expect("start metastore"),
            )
        })
        .collect();
    let endpoints: Vec<String> = clients
        .iter()
        .map(|c| c.trim_start_matches("http://").to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for ep in &endpoints {
        while !etcdctl(ep, &[], &["endpoint", "health"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{ep} did not come up: {}",
                std::fs::read_to_string(d.join("a.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let put = etcdctl(&endpoints[0], &[], &["put", "k", "replicated over TLS"]);
    assert!(put.status.success(), "{}", stderr(&put));
    for ep in &endpoints {
        let get = etcdctl(ep, &[], &["get", "k", "--print-value-only"]);
        assert_eq!(stdout(&get), "replicated over TLS\n", "{}", stderr(&get));
    }
    // The peer port takes only certificates from the peer CA naming `member`.
    let peer = format!("{}/", peers[0]);
    let ca_s = ca_file.to_str().expect("utf-8");
    let (named, _) = curl(
        &peer,
        &[
            "--cacert",
            ca_s,
            "--cert",
            cert_file.to_str().expect("utf-8"),
            "--key",
            key_file.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(
        named,
        "a member's own certificate was refused on the peer port"
    );
    let (intruder, _) = curl(
        &peer,
        &[
            "--cacert",
            ca_s,
            "--cert",
            intruder_c.to_str().expect("utf-8"),
            "--key",
            intruder_k.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(
        !intruder,
        "a certificate naming `intruder` got onto the peer port"
    );
    let (anonymous, _) = curl(&peer, &["--cacert", ca_s], None);
    assert!(!anonymous, "a peer without a certificate got in");
}

#[test]
fn versions_and_revoked_client_certificates() {
    use rcgen::{
        date_time_ymd, CertificateRevocationListParams, KeyIdMethod, RevokedCertParams,
        SerialNumber,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = new_ca("CA with a CRL");
    let (server_cert, server_key) = leaf(&ca, "server", &["127.0.0.1", "localhost"]);
    let (good_cert, good_key) = leaf(&ca, "good", &[]);
    let mut revoked = CertificateParams::new(Vec::<String>::new()).expect("params");
    revoked
        .distinguished_name
        .push(DnType::CommonName, "revoked");
    revoked.serial_number = Some(SerialNumber::from(77u64));
    let revoked_key = KeyPair::generate().expect("key");
    let revoked_cert = revoked.signed_by(&revoked_key, &ca.issuer).expect("sign");
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2020, 1, 1),
        next_update: date_time_ymd(2100, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(77u64),
            revocation_time: date_time_ymd(2021, 1, 1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .expect("crl");
    let ca_file = write(d, "ca.pem", &ca.pem);
    let crl_file = write(d, "crl.pem", &crl.pem().expect("crl pem"));
    let cert_file = write(d, "server.pem", &server_cert);
    let key_file = write(d, "server-key.pem", &server_key);
    let good_c = write(d, "good.pem", &good_cert);
    let good_k = write(d, "good-key.pem", &good_key);
    let revoked_c = write(d, "revoked.pem", &revoked_cert.pem());
    let revoked_k = write(d, "revoked-key.pem", &revoked_key.serialize_pem());

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let _server = Server(
        metastore(d, "v", &url, &peer, &format!("v={peer}"))
            .args(["--cert-file", cert_file.to_str().expect("utf-8")])
            .args(["--key-file", key_file.to_str().expect("utf-8")])
            .args(["--trusted-ca-file", ca_file.to_str().expect("utf-8")])
            .args(["--client-crl-file", crl_file.to_str().expect("utf-8")])
            .args(["--tls-max-version", "TLS1.2"])
            .spawn()
            .expect("start metastore"),
    );
    let ca_s = ca_file.to_str().expect("utf-8");
    let as_good = [
        "--cacert",
        ca_s,
        "--cert",
        good_c.to_str().expect("utf-8"),
        "--key",
        good_k.to_str().expect("utf-8"),
    ];
    let health = format!("{url}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&health, &as_good, None)
        .1
        .contains("\"health\":\"true\"")
    {
        assert!(
            Instant::now() < deadline,
            "metastore over TLS did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // --tls-max-version TLS1.2: a client that insists on 1.3 gets no session.
    let mut only_13 = as_good.to_vec();
    only_13.push("--tlsv1.3");
    assert!(!curl(&health, &only_13, None).0, "TLS 1.3 was offered");
    let mut up_to_12 = as_good.to_vec();
    up_to_12.extend(["--tls-max", "1.2"]);
    assert!(curl(&health, &up_to_12, None)
        .1
        .contains("\"health\":\"true\""));
    // The CRL revokes serial 77.
    let as_revoked = [
        "--cacert",
        ca_s,
        "--cert",
        revoked_c.to_str().expect("utf-8"),
        "--key",
        revoked_k.to_str().expect("utf-8"),
    ];
    assert!(
        !curl(&health, &as_revoked, None).0,
        "a revoked certificate got in"
    );
}
