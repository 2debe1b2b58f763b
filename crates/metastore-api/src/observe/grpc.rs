//! Every gRPC call recorded as grpc-go's Prometheus interceptor records it (started, handled
//! with its code, handling time), plus bytes both ways and the calls open now.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{Counter, Histogram};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
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

/// One method's counts. The hot path only adds to plain atomics; [`publish`] copies them into
/// the exported counters at scrape time (an increment through the facade per call, times
/// four series, cost a measurable share of a put).
struct MethodMetrics {
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    engine: &'static str,
    started: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    started_series: Counter,
    handled_ok_series: Counter,
    op_ok_series: Counter,
    /// etcd records it only with `--metrics extensive`.
    handling: Option<Histogram>,
    op_duration: Histogram,
}

impl MethodMetrics {
    fn new(
        service: &'static str,
        method: &'static str,
        kind: &'static str,
        engine: &'static str,
        extensive: bool,
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
            started: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started_series: metrics::counter!("grpc_server_started_total", &labels),
            handled_ok_series: metrics::counter!(
                "grpc_server_handled_total",
                "grpc_type" => kind, "grpc_service" => service, "grpc_method" => method, "grpc_code" => "OK"
            ),
            op_ok_series: metrics::counter!(
                "metastore_ops_total",
                "operation" => method, "storage_engine" => engine, "status" => "ok"
            ),
            handling: extensive
                .then(|| metrics::histogram!("grpc_server_handling_seconds", &labels)),
            op_duration: metrics::histogram!("metastore_op_duration_seconds", "operation" => method),
        }
    }

    fn finish(&self, code: tonic::Code, took: Duration) {
        if code == tonic::Code::Ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            // Failures are rare: their series are looked up as they happen.
            self.failed.fetch_add(1, Ordering::Relaxed);
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
        if let Some(h) = &self.handling {
            h.record(took.as_secs_f64());
        }
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

/// Every known method's counts, keyed by its path (`/etcdserverpb.KV/Put`), and the bytes.
pub(crate) struct Table {
    methods: HashMap<String, Arc<MethodMetrics>>,
    sent: AtomicU64,
    received: AtomicU64,
}

/// One table per process, as the exported series are.
static TABLE: OnceLock<Arc<Table>> = OnceLock::new();

/// The gRPC layer's state (cheap to clone).
#[derive(Clone)]
pub(crate) struct GrpcMetrics {
    table: Arc<Table>,
}

impl GrpcMetrics {
    /// `extensive`: also record `grpc_server_handling_seconds` (etcd's `--metrics extensive`).
    pub(crate) fn new(engine: &'static str, extensive: bool) -> Self {
        let table = TABLE.get_or_init(|| {
            let mut methods = HashMap::new();
            for (service, list) in METHODS {
                for (method, kind) in *list {
                    methods.insert(
                        format!("/{service}/{method}"),
                        Arc::new(MethodMetrics::new(service, method, kind, engine, extensive)),
                    );
                }
            }
            Arc::new(Table {
                methods,
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
            })
        });
        Self {
            table: table.clone(),
        }
    }
}

/// Copies the counts into the exported series (called at each scrape).
pub(crate) fn publish() {
    let Some(table) = TABLE.get() else {
        return;
    };
    let mut open = 0u64;
    for m in table.methods.values() {
        let (started, ok, failed) = (
            m.started.load(Ordering::Relaxed),
            m.ok.load(Ordering::Relaxed),
            m.failed.load(Ordering::Relaxed),
        );
        m.started_series.absolute(started);
        m.handled_ok_series.absolute(ok);
        m.op_ok_series.absolute(ok);
        open += started.saturating_sub(ok + failed);
    }
    metrics::gauge!("metastore_grpc_inflight_requests").set(open as f64);
    metrics::counter!("etcd_network_client_grpc_sent_bytes_total")
        .absolute(table.sent.load(Ordering::Relaxed));
    metrics::counter!("etcd_network_client_grpc_received_bytes_total")
        .absolute(table.received.load(Ordering::Relaxed));
}

impl GrpcMetrics {
    /// Records a gRPC call's start, and counts the request's body as it is read; None for a
    /// path that is no known method (plain HTTP, or an unknown method the fallback answers).
    pub(crate) fn start(&self, request: &mut http::Request<Body>) -> Option<Pending> {
        let metrics = self.table.methods.get(request.uri().path())?;
        metrics.started.fetch_add(1, Ordering::Relaxed);
        let body = std::mem::take(request.body_mut());
        *request.body_mut() = Body::new(Counted {
            inner: body,
            table: self.table.clone(),
        });
        Some(Pending(Some(Finish {
            metrics: metrics.clone(),
            started: Instant::now(),
            code: None,
            table: self.table.clone(),
        })))
    }
}

impl Pending {
    /// The handler answered: the call is handled (with its status code) once the response
    /// body ends or is dropped, and the body's bytes are counted.
    pub(crate) fn answered(mut self, response: Response) -> Response {
        // A trailers-only response (every error tonic answers) carries its status in the
        // headers.
        let header_code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from_i32);
        let finish = self.0.take().map(|mut f| {
            f.code = header_code;
            f
        });
        response.map(|body| {
            Body::new(Observed {
                inner: body,
                finish,
            })
        })
    }
}

/// Counts the data bytes of a request body into the table.
struct Counted {
    inner: Body,
    table: Arc<Table>,
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
                self.table
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
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
    table: Arc<Table>,
}

impl Finish {
    fn record(self, fallback: tonic::Code) {
        self.metrics
            .finish(self.code.unwrap_or(fallback), self.started.elapsed());
    }
}

/// A call whose handler has not answered yet (recorded as Canceled if the client goes first).
pub(crate) struct Pending(Option<Finish>);

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
                    if let Some(f) = &self.finish {
                        f.table.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
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
