//! The HTTP endpoints beside gRPC, as probes, load balancers and Prometheus meet them: curl
//! against the real binary, answers checked against etcd's bodies, codes and headers.

mod common;

use common::TestServer;
use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
use std::collections::HashMap;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One request with curl (HTTP/1.1, as probes send it).
fn curl(method: &str, url: &str) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-S", "-i", "-X", method, url])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url}: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn for_member(member: u64) -> AlarmOptions {
    let mut options = AlarmOptions::new();
    options.with_member(member);
    options
}

fn get(url: &str) -> Reply {
    curl("GET", url)
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_and_version_answer_as_etcd() {
    let metrics_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let server = TestServer::start_with_args(&["--listen-metrics-urls", &metrics_url]).await;
    let base = server.endpoint();

    let health = get(&format!("{base}/health"));
    assert_eq!(health.status, 200);
    assert_eq!(health.body, r#"{"health":"true","reason":""}"#);
    let health = get(&format!("{base}/health?serializable=true"));
    assert_eq!(health.status, 200, "{}", health.body);

    // Only GET, with Go's http.Error body and an Allow header.
    let post = curl("POST", &format!("{base}/health"));
    assert_eq!(post.status, 405);
    assert_eq!(post.body, "Method Not Allowed\n");
    assert_eq!(post.headers.get("allow").map(String::as_str), Some("GET"));

    let livez = get(&format!("{base}/livez"));
    assert_eq!((livez.status, livez.body.as_str()), (200, "ok\n"));
    let readyz = get(&format!("{base}/readyz?verbose"));
    assert_eq!(readyz.status, 200);
    assert_eq!(
        readyz.body,
        "[+]data_corruption ok\n[+]linearizable_read ok\n[+]non_learner ok\n[+]serializable_read ok\nok\n"
    );
    let readyz = get(&format!(
        "{base}/readyz?verbose&exclude=linearizable_read&exclude=no_such_check"
    ));
    assert_eq!(
        readyz.body,
        "[+]data_corruption ok\n[+]non_learner ok\n[+]serializable_read ok\nok\n"
    );
    let one = get(&format!("{base}/readyz/non_learner?verbose"));
    assert_eq!(one.body, "[+]non_learner ok\nok\n");
    assert_eq!(
        one.headers.get("content-type").map(String::as_str),
        Some("text/plain; charset=utf-8")
    );

    let version = get(&format!("{base}/version"));
    assert_eq!(version.status, 200);
    let v: serde_json::Value = serde_json::from_str(&version.body).expect("json");
    assert_eq!(v["etcdserver"], "3.5.0");
    assert!(
        v["etcdcluster"] == "3.5.0" || v["etcdcluster"] == "not_decided",
        "{v}"
    );

    // The metrics listener serves the same probes and the metrics, and nothing of gRPC.
    assert_eq!(get(&format!("{metrics_url}/health")).status, 200);
    let metrics = get(&format!("{metrics_url}/metrics"));
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("etcd_server_has_leader 1"));
    assert_eq!(get(&format!("{metrics_url}/v3/kv/range")).status, 404);

    // grpc.health.v1 for gRPC probes: the whole server ("") is SERVING.
    let channel = tonic::transport::Endpoint::from_shared(base.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut probe = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = probe
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_an_alarm_is_raised() {
    let server = TestServer::start().await;
    let base = server.endpoint();
    let mut client = server.client().await;
    let member = client
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id();
    client
        .alarm(
            AlarmAction::Activate,
            AlarmType::Nospace,
            Some(for_member(member)),
        )
        .await
        .expect("raise NOSPACE");

    let health = get(&format!("{base}/health"));
    assert_eq!(health.status, 503);
    assert_eq!(
        health.body,
        "{\"health\":\"false\",\"reason\":\"ALARM NOSPACE\"}\n"
    );
    assert_eq!(
        health.headers.get("content-type").map(String::as_str),
        Some("text/plain; charset=utf-8")
    );
    // An operator may exclude an alarm they know about.
    assert_eq!(get(&format!("{base}/health?exclude=NOSPACE")).status, 200);
    // NOSPACE is no data corruption: the member stays ready.
    assert_eq!(get(&format!("{base}/readyz")).status, 200);

    client
        .alarm(
            AlarmAction::Deactivate,
            AlarmType::Nospace,
            Some(for_member(member)),
        )
        .await
        .expect("disarm");
    assert_eq!(get(&format!("{base}/health")).status, 200);

    let corrupt = client
        .alarm(
            AlarmAction::Activate,
            AlarmType::Corrupt,
            Some(for_member(member)),
        )
        .await;
    if corrupt.is_ok() {
        let readyz = get(&format!("{base}/readyz"));
        assert_eq!(readyz.status, 503);
        assert!(
            readyz
                .body
                .starts_with("[-]data_corruption failed: alarm activated: CORRUPT\n"),
            "{}",
            readyz.body
        );
        assert_eq!(
            get(&format!("{base}/health")).body,
            "{\"health\":\"false\",\"reason\":\"ALARM CORRUPT\"}\n"
        );
    }
}

/// The value of the one series `name` (with exactly these labels) in a scrape.
fn series(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name_and_labels).then(|| value.parse().ok())?
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_etcds_series_and_they_move_under_load() {
    let server = TestServer::start_with_args(&["--metrics", "extensive"]).await;
    let url = format!("{}/metrics", server.endpoint());
    let before = get(&url);
    assert_eq!(before.status, 200);
    assert!(before.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let before = before.body;

    let mut client = server.client().await;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let mut c = client.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    c.put(format!("load/{w}/{i}"), vec![b'x'; 100], None)
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    client.get("load/0/0", None).await.expect("get");
    let missing = client
        .put(
            "k",
            "v",
            Some(etcd_client::PutOptions::new().with_lease(42)),
        )
        .await;
    assert!(missing.is_err(), "a put on a missing lease fails");

    let after = get(&url).body;
    // The suite runs on either engine.
    let engine = after
        .lines()
        .find_map(|l| l.strip_prefix("metastore_storage_engine_info{storage_engine=\""))
        .and_then(|rest| rest.split('"').next())
        .expect("the engine's info series")
        .to_string();
    let ops_ok =
        format!(r#"metastore_ops_total{{operation="Put",storage_engine="{engine}",status="ok"}}"#);
    let put_ok = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="OK"}"#;
    let put_started = r#"grpc_server_started_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put"}"#;
    let put_not_found = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="NotFound"}"#;
    assert_eq!(series(&before, put_ok), Some(0.0));
    assert_eq!(series(&after, put_ok), Some(400.0));
    assert_eq!(series(&after, put_started), Some(401.0));
    assert_eq!(series(&after, put_not_found), Some(1.0));
    assert_eq!(series(&after, "etcd_server_has_leader"), Some(1.0));
    assert_eq!(series(&after, "etcd_server_is_leader"), Some(1.0));
    assert!(series(&after, "etcd_server_leader_changes_seen_total") >= Some(1.0));
    assert!(series(&after, "etcd_debugging_mvcc_keys_total") >= Some(400.0));
    assert_eq!(
        series(&after, "etcd_server_quota_backend_bytes"),
        Some(2.0 * 1024.0 * 1024.0 * 1024.0)
    );
    // Counters and gauges that must have grown with the load.
    for name in [
        "etcd_server_proposals_committed_total",
        "etcd_server_proposals_applied_total",
        "etcd_disk_wal_fsync_duration_seconds_count",
        "metastore_wal_fsync_duration_seconds_count",
        "etcd_disk_backend_commit_duration_seconds_count",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_network_client_grpc_received_bytes_total",
        "etcd_network_client_grpc_sent_bytes_total",
        "metastore_raft_proposal_batch_size_count",
        r#"grpc_server_handling_seconds_count{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put"}"#,
        ops_ok.as_str(),
        r#"metastore_op_duration_seconds_count{operation="Put"}"#,
    ] {
        let (b, a) = (series(&before, name).unwrap_or(0.0), series(&after, name));
        assert!(a.is_some_and(|a| a > b), "{name}: {b} -> {a:?}");
    }
    assert!(
        series(&after, "etcd_server_proposals_failed_total").is_some(),
        "failed proposals are reported (0) before any fails"
    );
    assert!(series(&after, "process_resident_memory_bytes").is_some_and(|v| v > 1e6));
    assert!(series(&after, "process_open_fds").is_some_and(|v| v > 0.0));
    for ty in [
        "# TYPE etcd_disk_wal_fsync_duration_seconds histogram",
        "# TYPE grpc_server_handled_total counter",
        "# TYPE etcd_server_has_leader gauge",
        "# TYPE etcd_server_proposals_committed_total gauge",
    ] {
        assert!(after.contains(ty), "{ty}");
    }
    // etcd's buckets for the disk histograms (1 ms doubling), which its alerts quantile over.
    assert!(after.contains(r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"}"#));
    assert!(after.contains(r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="8.192"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_auto_compaction_keeps_the_last_revisions() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "auto-compaction-revision-interval-ms: 300\n").expect("config");
    let server = TestServer::start_with_args(&[
        "--config-file",
        config.to_str().expect("utf-8"),
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "10",
    ])
    .await;
    let mut client = server.client().await;
    let mut last = 0;
    for i in 0..40 {
        last = client
            .put("key", format!("v{i}"), None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
    }
    let compacted = wait_for_compaction(&server, last - 10).await;
    assert_eq!(compacted, last - 10, "compacted to current - retention");
    // History after the compaction point is still there.
    let old = client
        .get(
            "key",
            Some(etcd_client::GetOptions::new().with_revision(last - 5)),
        )
        .await
        .expect("a kept revision reads");
    assert_eq!(old.kvs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_keeps_the_last_period() {
    let server = TestServer::start_with_args(&[
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "2s",
    ])
    .await;
    let mut client = server.client().await;
    let first = client
        .put("key", "v", None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    // Writes over ~3 s: the compaction point is a revision sampled one period ago.
    let started = std::time::Instant::now();
    let mut revisions = Vec::new();
    while started.elapsed() < Duration::from_millis(3500) {
        let rev = client
            .put("key", "v", None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
        revisions.push((started.elapsed(), rev));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let compacted = wait_for_compaction(&server, first).await;
    let newest_at = |age: Duration| {
        revisions
            .iter()
            .filter(|(t, _)| *t <= started.elapsed().saturating_sub(age))
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(first)
    };
    // Nothing younger than the period (less the sampling step of a tenth) was compacted.
    assert!(
        compacted <= newest_at(Duration::from_millis(1800)),
        "compacted to {compacted}, revisions {revisions:?}"
    );
}

/// Waits until the member has compacted to at least `at_least`; returns the compact revision.
async fn wait_for_compaction(server: &TestServer, at_least: i64) -> i64 {
    let mut client = server.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let compacted = compact_revision(&mut client).await;
        if compacted >= at_least {
            return compacted;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no auto-compaction to at least {at_least} (at {compacted}): {}",
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The oldest revision still readable: reads below the compact revision fail with
/// ErrCompacted, reads at it and above succeed (1 when nothing was compacted).
async fn compact_revision(client: &mut etcd_client::Client) -> i64 {
    let mut rev = 1;
    loop {
        let read = client
            .get(
                "key",
                Some(etcd_client::GetOptions::new().with_revision(rev)),
            )
            .await;
        if read.is_ok() {
            return rev;
        }
        rev += 1;
    }
}
