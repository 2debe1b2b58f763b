//! etcd's probes, answered as etcd 3.5 answers them: `/health` (JSON, with `?exclude=ALARM`
//! and `?serializable=true`), and the check registries `/livez` and `/readyz` (plain text,
//! `?exclude=check`, `?verbose`, one sub-path per check). Load balancers and Kubernetes probes
//! match on these bodies and status codes.

use super::{go_http_error, method_not_allowed, query_pairs};
use crate::services::Svc;
use crate::EtcdServer;
use axum::response::{IntoResponse, Response};
use http::{header, Method, StatusCode, Uri};
use metastore_engine::Engine;
use metastore_proto::etcdserverpb::{AlarmType, RangeRequest};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The checks of each registry, in the order their lines are written.
pub(crate) const LIVEZ_CHECKS: &[&str] = &["serializable_read"];
pub(crate) const READYZ_CHECKS: &[&str] = &[
    "data_corruption",
    "linearizable_read",
    "non_learner",
    "serializable_read",
];

/// `/health`: alarms first, then the leader, then a one-key read (linearizable unless
/// `serializable=true`), as etcd checks them; 503 with the reason in the body otherwise.
pub(crate) async fn health<E: Engine>(
    server: Arc<EtcdServer<E>>,
    method: Method,
    uri: Uri,
) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    let pairs = query_pairs(&uri);
    let excluded: BTreeSet<&str> = pairs
        .iter()
        .filter(|(k, v)| k == "exclude" && !v.is_empty())
        .map(|(_, v)| v.as_str())
        .collect();
    let serializable = pairs
        .iter()
        .find(|(k, _)| k == "serializable")
        .is_some_and(|(_, v)| v == "true");
    let reason = unhealthy_reason(&server, &excluded, serializable).await;
    let healthy = reason.is_none();
    metrics::counter!(if healthy {
        "etcd_server_health_success"
    } else {
        "etcd_server_health_failures"
    })
    .increment(1);
    let body = serde_json::json!({
        "health": if healthy { "true" } else { "false" },
        "reason": reason.clone().unwrap_or_default(),
    })
    .to_string();
    if healthy {
        (StatusCode::OK, body).into_response()
    } else {
        tracing::warn!(output = %body, "/health error");
        go_http_error(StatusCode::SERVICE_UNAVAILABLE, &body)
    }
}

async fn unhealthy_reason<E: Engine>(
    server: &Arc<EtcdServer<E>>,
    excluded: &BTreeSet<&str>,
    serializable: bool,
) -> Option<String> {
    for alarm in server.store.alarms() {
        let name = AlarmType::try_from(alarm.alarm)
            .map(|a| a.as_str_name())
            .unwrap_or("UNKNOWN");
        if excluded.contains(name) {
            continue;
        }
        return Some(match AlarmType::try_from(alarm.alarm) {
            Ok(AlarmType::Nospace) => "ALARM NOSPACE".to_string(),
            Ok(AlarmType::Corrupt) => "ALARM CORRUPT".to_string(),
            _ => "ALARM UNKNOWN".to_string(),
        });
    }
    if !serializable && server.raft.status().leader_id == 0 {
        return Some("RAFT NO LEADER".to_string());
    }
    match read_check(server, serializable).await {
        Ok(()) => None,
        Err(e) => Some(format!("RANGE ERROR:{e}")),
    }
}

/// A one-key, keys-only read through the same path a client's Range takes.
async fn read_check<E: Engine>(
    server: &Arc<EtcdServer<E>>,
    serializable: bool,
) -> Result<(), String> {
    let svc = Svc(server.clone());
    svc.read_barrier(serializable)
        .await
        .map_err(|s| s.message().to_string())?;
    // etcd's probe: the empty key, which no client can write, so the read is as cheap as
    // one can be.
    let request = RangeRequest {
        limit: 1,
        keys_only: true,
        serializable,
        ..Default::default()
    };
    server
        .store
        .range(&request)
        .map(|_| ())
        .map_err(|e| crate::errors::from_mvcc(e).message().to_string())
}

async fn run_check<E: Engine>(server: &Arc<EtcdServer<E>>, name: &str) -> Result<(), String> {
    match name {
        "data_corruption" => {
            let corrupt = server
                .store
                .alarms()
                .iter()
                .any(|a| a.alarm == AlarmType::Corrupt as i32);
            if corrupt {
                Err("alarm activated: CORRUPT".to_string())
            } else {
                Ok(())
            }
        }
        "serializable_read" => read_check(server, true).await,
        "linearizable_read" => read_check(server, false).await,
        "non_learner" => {
            if server.is_learner() {
                Err("not supported for learner".to_string())
            } else {
                Ok(())
            }
        }
        other => Err(format!("unknown check {other}")),
    }
}

/// `/livez` or `/readyz` (all checks but the excluded ones), or `/livez/<check>`.
pub(crate) async fn checks<E: Engine>(
    server: Arc<EtcdServer<E>>,
    kind: &'static str,
    registry: &'static [&'static str],
    only: Option<&'static str>,
    method: Method,
    uri: Uri,
) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    let pairs = query_pairs(&uri);
    let names: Vec<&str> = match only {
        Some(name) => vec![name],
        None => {
            let excluded: BTreeSet<&str> = pairs
                .iter()
                .filter(|(k, v)| k == "exclude" && !v.is_empty())
                .map(|(_, v)| v.as_str())
                .collect();
            let missing: Vec<&&str> = excluded.iter().filter(|e| !registry.contains(e)).collect();
            if !missing.is_empty() {
                // As etcd: excluding a check this version lacks does not fail the probe.
                tracing::warn!(missing = ?missing, "some health checks cannot be excluded");
            }
            registry
                .iter()
                .copied()
                .filter(|c| !excluded.contains(c))
                .collect()
        }
    };
    let mut report = String::new();
    let mut failed = false;
    for name in names {
        let (line, status) = match run_check(&server, name).await {
            Ok(()) => (format!("[+]{name} ok\n"), "success"),
            Err(e) => {
                failed = true;
                (format!("[-]{name} failed: {e}\n"), "error")
            }
        };
        report.push_str(&line);
        let labels = [("type", kind.to_string()), ("name", name.to_string())];
        metrics::gauge!("etcd_server_healthcheck", &labels).set(if status == "success" {
            1.0
        } else {
            0.0
        });
        let labels = [
            ("type", kind.to_string()),
            ("name", name.to_string()),
            ("status", status.to_string()),
        ];
        metrics::counter!("etcd_server_healthchecks_total", &labels).increment(1);
    }
    if failed {
        tracing::error!(kind, reason = %report, "health check error");
        // Go's http.Error adds a newline after the report's own.
        return go_http_error(StatusCode::SERVICE_UNAVAILABLE, &report);
    }
    let mut body = String::new();
    if pairs.iter().any(|(k, _)| k == "verbose") {
        body.push_str(&report);
    }
    body.push_str("ok\n");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
