//! Every gRPC call recorded as grpc-go's Prometheus interceptor records it (started, handled
//! with its code, handling time), plus bytes both ways and the calls open now.

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{Counter, Gauge, Histogram};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    inflight: Gauge,
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
            inflight: metrics::gauge!("metastore_grpc_inflight_requests"),
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
    metrics.started.increment(1);
    grpc.inflight.increment(1.0);
    // Recorded as Canceled if the client goes before the handler answers.
    let mut pending = Pending(Some(Finish {
        metrics: metrics.clone(),
        started: Instant::now(),
        code: None,
        inflight: grpc.inflight.clone(),
    }));
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
    let finish = pending.0.take().map(|mut f| {
        f.code = header_code;
        f
    });
    response.map(|body| {
        Body::new(Observed {
            inner: body,
            finish,
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
    inflight: Gauge,
    started: Instant,
    code: Option<tonic::Code>,
}

impl Finish {
    fn record(self, fallback: tonic::Code) {
        self.inflight.decrement(1.0);
        self.metrics
            .finish(self.code.unwrap_or(fallback), self.started.elapsed());
    }
}

/// A call whose handler has not answered yet.
struct Pending(Option<Finish>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.record(tonic::Code::Cancelled);
        }
    }
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
            f.record(fallback);
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
