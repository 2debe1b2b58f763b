//! Probes and metrics of a real 3-member cluster: every series the shipped Grafana dashboard
//! and alert rules query is exported, the peer series move, and `/health` says what etcd says
//! when the quorum is gone.

mod cluster_harness;

use cluster_harness::Cluster;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// GET with curl: (status, body).
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url}: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.parse().expect("status"), body.to_string())
}

fn repo_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a PromQL expression reads (label matchers and `by`/`without` lists
/// removed; only MetaStore's and etcd's families, not Prometheus' own `up`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut text = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => text.push(c),
            _ => {}
        }
    }
    for keyword in ["by", "without"] {
        while let Some(at) = find_word(&text, keyword) {
            let Some(open) = text[at..].find('(').map(|o| at + o) else {
                break;
            };
            let close = text[open..]
                .find(')')
                .map(|c| open + c)
                .expect("closing paren");
            text.replace_range(at..=close, " ");
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            ["etcd_", "grpc_", "process_", "metastore_"]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().last();
        let after = text[i + word.len()..].trim_start().chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && after == Some('(')
    })
}

/// Every expression of the shipped alert rules and dashboard.
fn shipped_expressions() -> Vec<String> {
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("configs/prometheus-alerts.yaml")).expect("alerts yaml");
    let mut exprs = Vec::new();
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            assert!(rule["alert"].as_str().is_some(), "{rule:?}");
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("warning" | "critical")
                ),
                "{rule:?}"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{rule:?}"
            );
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("configs/grafana-dashboard.json")).expect("dashboard json");
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

/// The series families a scrape holds (histograms under their base name and their parts).
fn families(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_count", "_sum"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn metric_names_ignore_labels_and_groupings() {
    let names = metric_names(
        r#"100 * sum(rate(grpc_server_handled_total{grpc_code=~"Unknown"}[5m])) without (grpc_type, grpc_code) / histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket[5m]))) or up{job="etcd"}"#,
    );
    let expected: BTreeSet<String> = [
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_read_exported_series_and_health_follows_the_quorum() {
    // etcd-mixin's slow-request alert reads the per-method latency histograms, which etcd
    // (and MetaStore) record with `--metrics extensive`.
    let mut cluster = Cluster::create(3);
    cluster.extra_args = vec!["--metrics".into(), "extensive".into()];
    for i in 0..3 {
        cluster.spawn(i);
    }
    let leader = cluster.leader(Duration::from_secs(20)).await;
    let mut client = cluster.client(leader).await;
    for i in 0..50 {
        client.put(format!("k{i}"), "v", None).await.expect("put");
    }
    // The round-trip prober measures as soon as a peer stream is up.
    let mut scrapes = Vec::new();
    for i in 0..3 {
        let (status, body) = get(&format!("{}/metrics", cluster.endpoint(i)));
        assert_eq!(status, 200);
        scrapes.push(body);
    }
    let exported: BTreeSet<String> = scrapes.iter().flat_map(|s| families(s)).collect();
    let mut missing = BTreeSet::new();
    for expr in shipped_expressions() {
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                missing.insert(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard or alerts read series no member exports: {missing:?}"
    );
    let leader_scrape = &scrapes[leader];
    assert!(leader_scrape.contains("etcd_server_is_leader 1"));
    assert!(leader_scrape
        .lines()
        .any(|l| l.starts_with("etcd_network_peer_sent_bytes_total{To=") && !l.ends_with(" 0")));
    assert!(scrapes.iter().enumerate().all(|(i, s)| i == leader
        || s.lines().any(
            |l| l.starts_with("etcd_network_peer_received_bytes_total{From=") && !l.ends_with(" 0")
        )));
    assert!(leader_scrape.contains("etcd_network_peer_round_trip_time_seconds_count{To="));

    // Two members gone: the survivor has no leader once CheckQuorum steps it down.
    let survivor = (leader + 1) % 3;
    for i in 0..3 {
        if i != survivor {
            cluster.kill9(i);
        }
    }
    let base = cluster.endpoint(survivor);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Until its election timeout passes, the survivor may still name the old leader and
        // its read fails instead (`RANGE ERROR:...`); then it knows there is none.
        let (status, body) = get(&format!("{base}/health"));
        if body == "{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}\n" {
            assert_eq!(status, 503);
            break;
        }
        assert!(Instant::now() < deadline, "/health stayed {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A liveness probe asks about this process, not the cluster.
    let (status, body) = get(&format!("{base}/health?serializable=true"));
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    assert_eq!(get(&format!("{base}/livez")).0, 200);
    let (_, scrape) = get(&format!("{base}/metrics"));
    assert!(scrape.contains("etcd_server_has_leader 0"), "{scrape}");
    assert!(scrape
        .lines()
        .any(|l| l.starts_with("etcd_network_peer_sent_failures_total{To=") && !l.ends_with(" 0")));
}
