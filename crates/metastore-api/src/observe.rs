//! Prometheus metrics under etcd's names, so that etcd's Grafana dashboard and the etcd-mixin
//! alerts work unchanged, plus MetaStore's own (`metastore_*`).
//!
//! Each crate records through the `metrics` facade where the event happens (the WAL its
//! fsyncs, raft its leader changes, the transport its peers' bytes and round trips); this
//! module installs the process's one recorder, gives each histogram etcd's buckets, records
//! every gRPC call ([`grpc_layer`]), and samples the server's state (leader, indexes, sizes)
//! at each scrape instead of on a timer.

use crate::EtcdServer;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metastore_engine::Engine;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot install the metrics recorder: {0}")]
    Install(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot start the metrics upkeep thread: {0}")]
    Thread(#[from] std::io::Error),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their buckets (bounds the memory they take
/// between scrapes).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// etcd's buckets for disk latencies: 1 ms to 8 s, doubling.
fn disk_buckets() -> Vec<f64> {
    (0..14).map(|i| 0.001 * f64::powi(2.0, i)).collect()
}

/// Installs the process's recorder once (a second member in the same process shares it).
pub fn install() -> Result<(), ObserveError> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let builder = PrometheusBuilder::new()
        // Prometheus' client default, which grpc-go's interceptor uses.
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .set_buckets_for_metric(
            Matcher::Suffix("_fsync_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_disk_backend_commit_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_network_peer_round_trip_time_seconds".into()),
            &(0..16)
                .map(|i| 0.0001 * f64::powi(2.0, i))
                .collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("metastore_op_duration_seconds".into()),
            &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
        )?
        .set_buckets_for_metric(
            Matcher::Full("metastore_raft_proposal_batch_size".into()),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
        )?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Lost a race with another member starting in this process: theirs serves both.
        return Ok(());
    }
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })?;
    let _ = HANDLE.set(handle);
    describe();
    metrics_process::Collector::default().describe();
    // Present (at 0) before the first one, so that rate() and alerts see the series.
    metrics::counter!("etcd_server_proposals_failed_total").increment(0);
    metrics::counter!("etcd_server_leader_changes_seen_total").increment(0);
    Ok(())
}

/// The Prometheus text of every metric, with the server's state sampled now; None when no
/// recorder is installed.
pub(crate) fn render<E: Engine>(server: &EtcdServer<E>) -> Option<String> {
    let handle = HANDLE.get()?;
    sample(server);
    metrics_process::Collector::default().collect();
    Some(handle.render())
}

/// Gauges read off the server at scrape time.
fn sample<E: Engine>(server: &EtcdServer<E>) {
    let raft = server.raft.status();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    metrics::gauge!("etcd_server_has_leader").set(flag(raft.leader_id != 0));
    metrics::gauge!("etcd_server_is_leader").set(flag(raft.is_leader));
    metrics::gauge!("etcd_server_is_learner").set(flag(server.is_learner()));
    metrics::gauge!("etcd_server_id", "server_id" => format!("{:x}", server.cluster.member_id))
        .set(1.0);
    metrics::gauge!("etcd_server_version", "server_version" => crate::ETCD_API_VERSION).set(1.0);
    if server.store.cluster_version().is_some() {
        metrics::gauge!("etcd_cluster_version", "cluster_version" => "3.5").set(1.0);
    }
    metrics::gauge!("etcd_server_proposals_committed_total").set(raft.commit_index as f64);
    metrics::gauge!("etcd_server_proposals_applied_total").set(raft.applied_index as f64);
    metrics::gauge!("etcd_server_proposals_pending")
        .set(server.proposer.stats().pending.load(Ordering::Relaxed) as f64);
    let size = server.store.engine().size_bytes() as f64;
    metrics::gauge!("etcd_mvcc_db_total_size_in_bytes").set(size);
    metrics::gauge!("etcd_mvcc_db_total_size_in_use_in_bytes").set(size);
    metrics::gauge!("etcd_debugging_mvcc_db_total_size_in_bytes").set(size);
    metrics::gauge!("etcd_server_quota_backend_bytes").set(server.limits.quota_bytes() as f64);
    metrics::gauge!("etcd_debugging_mvcc_keys_total").set(server.store.key_count() as f64);
    metrics::gauge!("etcd_debugging_mvcc_current_revision")
        .set(server.store.current_revision() as f64);
    metrics::gauge!("etcd_debugging_mvcc_compact_revision")
        .set(server.store.compact_revision() as f64);
    metrics::gauge!(
        "metastore_storage_engine_info",
        "storage_engine" => server.store.engine().name()
    )
    .set(1.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not."
    );
    describe_gauge!(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        "etcd_server_id",
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID."
    );
    describe_gauge!(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version."
    );
    describe_gauge!(
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version"
    );
    describe_counter!(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen."
    );
    describe_gauge!(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed."
    );
    describe_gauge!(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied."
    );
    describe_gauge!(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit."
    );
    describe_counter!(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen."
    );
    describe_counter!(
        "etcd_server_health_success",
        "The total number of successful health checks"
    );
    describe_counter!(
        "etcd_server_health_failures",
        "The total number of failed health checks"
    );
    describe_gauge!(
        "etcd_server_healthcheck",
        "The result of each kind of healthcheck."
    );
    describe_counter!(
        "etcd_server_healthchecks_total",
        "The total number of each kind of healthcheck."
    );
    describe_histogram!(
        "etcd_disk_wal_fsync_duration_seconds",
        Unit::Seconds,
        "The latency distributions of fsync called by WAL."
    );
    describe_histogram!(
        "etcd_disk_backend_commit_duration_seconds",
        Unit::Seconds,
        "The latency distributions of commit called by backend."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes."
    );
    describe_gauge!("etcd_debugging_mvcc_keys_total", "Total number of keys.");
    describe_gauge!(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store."
    );
    describe_counter!(
        "etcd_network_peer_sent_bytes_total",
        "The total number of bytes sent to peers."
    );
    describe_counter!(
        "etcd_network_peer_received_bytes_total",
        "The total number of bytes received from peers."
    );
    describe_counter!(
        "etcd_network_peer_sent_failures_total",
        "The total number of send failures from peers."
    );
    describe_histogram!(
        "etcd_network_peer_round_trip_time_seconds",
        Unit::Seconds,
        "Round-Trip-Time histogram between peers"
    );
    describe_counter!(
        "etcd_network_client_grpc_sent_bytes_total",
        "The total number of bytes sent to grpc clients."
    );
    describe_counter!(
        "etcd_network_client_grpc_received_bytes_total",
        "The total number of bytes received from grpc clients."
    );
    describe_counter!(
        "grpc_server_started_total",
        "Total number of RPCs started on the server."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_histogram!("grpc_server_handling_seconds", Unit::Seconds, "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.");
    describe_counter!(
        "metastore_ops_total",
        "Client operations by operation, storage engine and outcome."
    );
    describe_histogram!(
        "metastore_op_duration_seconds",
        Unit::Seconds,
        "Client operation latency by operation."
    );
    describe_histogram!(
        "metastore_raft_proposal_batch_size",
        "Commands per proposed raft entry."
    );
    describe_histogram!(
        "metastore_wal_fsync_duration_seconds",
        Unit::Seconds,
        "The latency of each WAL group-commit fsync."
    );
    describe_gauge!(
        "metastore_storage_engine_info",
        "The storage engine this member runs on."
    );
}

/// The kind of each gRPC method, as grpc-go's Prometheus interceptor labels it.
const METHODS: &[(&str, &[(&str, &str)])] = &[
    (
        "etcdserverpb.KV",
        &[
            ("Range", "unary"),
            ("Put", "unary"),
            ("DeleteRange", "unary"),
            ("Txn", "unary"),
            ("Compact", "unary"),
        ],
    ),
    ("etcdserverpb.Watch", &[("Watch", "bidi_stream")]),
    (
        "etcdserverpb.Lease",
        &[
            ("LeaseGrant", "unary"),
            ("LeaseRevoke", "unary"),
            ("LeaseKeepAlive", "bidi_stream"),
            ("LeaseTimeToLive", "unary"),
            ("LeaseLeases", "unary"),
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            ("MemberAdd", "unary"),
            ("MemberRemove", "unary"),
            ("MemberUpdate", "unary"),
            ("MemberList", "unary"),
            ("MemberPromote", "unary"),
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            ("Alarm", "unary"),
            ("Status", "unary"),
            ("Defragment", "unary"),
            ("Hash", "unary"),
            ("HashKV", "unary"),
            ("Snapshot", "server_stream"),
            ("MoveLeader", "unary"),
            ("Downgrade", "unary"),
        ],
    ),
    (
        "etcdserverpb.Auth",
        &[
            ("AuthEnable", "unary"),
            ("AuthDisable", "unary"),
            ("AuthStatus", "unary"),
            ("Authenticate", "unary"),
            ("UserAdd", "unary"),
            ("UserGet", "unary"),
            ("UserList", "unary"),
            ("UserDelete", "unary"),
            ("UserChangePassword", "unary"),
            ("UserGrantRole", "unary"),
            ("UserRevokeRole", "unary"),
            ("RoleAdd", "unary"),
            ("RoleGet", "unary"),
            ("RoleList", "unary"),
            ("RoleDelete", "unary"),
            ("RoleGrantPermission", "unary"),
            ("RoleRevokePermission", "unary"),
        ],
    ),
    ("v3lockpb.Lock", &[("Lock", "unary"), ("Unlock", "unary")]),
    (
        "v3electionpb.Election",
        &[
            ("Campaign", "unary"),
            ("Proclaim", "unary"),
            ("Leader", "unary"),
            ("Observe", "server_stream"),
            ("Resign", "unary"),
        ],
    ),
    (
        "metastore.v1.Batch",
        &[("BatchPut", "unary"), ("BatchGet", "unary")],
    ),
    (
        "grpc.health.v1.Health",
        &[("Check", "unary"), ("Watch", "server_stream")],
    ),
];

/// The metric handles of one method, looked up once: a request then costs a few atomic adds.
struct MethodMetrics {
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    engine: &'static str,
    started: Counter,
    handled_ok: Counter,
    handling: Histogram,
    op_ok: Counter,
    op_duration: Histogram,
}

impl MethodMetrics {
    fn new(
        service: &'static str,
        method: &'static str,
        kind: &'static str,
        engine: &'static str,
    ) -> Self {
        let labels = [
            ("grpc_type", kind),
            ("grpc_service", service),
            ("grpc_method", method),
        ];
        Self {
            service,
            method,
            kind,
            engine,
            started: metrics::counter!("grpc_server_started_total", &labels),
            handled_ok: metrics::counter!(
                "grpc_server_handled_total",
                "grpc_type" => kind, "grpc_service" => service, "grpc_method" => method, "grpc_code" => "OK"
            ),
            handling: metrics::histogram!("grpc_server_handling_seconds", &labels),
            op_ok: metrics::counter!(
                "metastore_ops_total",
                "operation" => method, "storage_engine" => engine, "status" => "ok"
            ),
            op_duration: metrics::histogram!("metastore_op_duration_seconds", "operation" => method),
        }
    }

    fn finish(&self, code: tonic::Code, took: Duration) {
        if code == tonic::Code::Ok {
            self.handled_ok.increment(1);
            self.op_ok.increment(1);
        } else {
            metrics::counter!(
                "grpc_server_handled_total",
                "grpc_type" => self.kind,
                "grpc_service" => self.service,
                "grpc_method" => self.method,
                "grpc_code" => code_name(code)
            )
            .increment(1);
            metrics::counter!(
                "metastore_ops_total",
                "operation" => self.method, "storage_engine" => self.engine, "status" => "error"
            )
            .increment(1);
        }
        self.handling.record(took.as_secs_f64());
        if self.kind == "unary" {
            self.op_duration.record(took.as_secs_f64());
        }
    }
}

/// grpc-go's names of the status codes, as `grpc_code` labels carry them.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Every known method's handles, keyed by its path (`/etcdserverpb.KV/Put`).
#[derive(Clone)]
pub(crate) struct GrpcMetrics {
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
    sent: Counter,
    received: Counter,
}

impl GrpcMetrics {
    pub(crate) fn new(engine: &'static str) -> Self {
        let mut methods = HashMap::new();
        for (service, list) in METHODS {
            for (method, kind) in *list {
                methods.insert(
                    format!("/{service}/{method}"),
                    Arc::new(MethodMetrics::new(service, method, kind, engine)),
                );
            }
        }
        Self {
            methods: Arc::new(methods),
            sent: metrics::counter!("etcd_network_client_grpc_sent_bytes_total"),
            received: metrics::counter!("etcd_network_client_grpc_received_bytes_total"),
        }
    }
}

/// Records a gRPC call: started when it arrives, handled (with its status code) when its
/// response body ends or is dropped, bytes both ways. Plain HTTP requests pass untouched.
pub(crate) async fn grpc_layer(
    axum::extract::State(grpc): axum::extract::State<GrpcMetrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(metrics) = grpc.methods.get(request.uri().path()) else {
        return next.run(request).await;
    };
    let started = Instant::now();
    metrics.started.increment(1);
    let request = request.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: grpc.received.clone(),
        })
    });
    let response = next.run(request).await;
    // A trailers-only response (every error tonic answers) carries its status in the headers.
    let header_code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32);
    let metrics = metrics.clone();
    response.map(|body| {
        Body::new(Observed {
            inner: body,
            finish: Some(Finish {
                metrics,
                started,
                code: header_code,
            }),
            sent: grpc.sent.clone(),
        })
    })
}

/// Counts the data bytes of a body into `bytes`.
struct Counted {
    inner: Body,
    bytes: Counter,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.increment(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct Finish {
    metrics: Arc<MethodMetrics>,
    started: Instant,
    code: Option<tonic::Code>,
}

/// A response body that records its call as handled once it ends (or is dropped: a stream the
/// client cancelled counts as `Canceled`, as grpc-go counts it).
struct Observed {
    inner: Body,
    finish: Option<Finish>,
    sent: Counter,
}

impl Observed {
    fn record(&mut self, fallback: tonic::Code) {
        if let Some(f) = self.finish.take() {
            f.metrics
                .finish(f.code.unwrap_or(fallback), f.started.elapsed());
        }
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent.increment(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32);
                    if let Some(f) = self.finish.as_mut() {
                        f.code = f.code.or(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => self.record(tonic::Code::Internal),
            Poll::Ready(None) => self.record(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Ended without its trailers being read: a trailers-only answer has its code from the
        // headers; anything else was cut short by the client.
        self.record(tonic::Code::Cancelled);
    }
}
