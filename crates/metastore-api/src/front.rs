//! What every gRPC call passes through before its service, in one hand-written tower layer
//! (two `axum::middleware::from_fn` layers cost a measurable share of a small request: each
//! boxes the rest of the stack per call):
//! - the gate: a learner refuses what etcd's learners refuse (`etcdserver: rpc not supported
//!   for learner`), and etcd's `hasleader` metadata (clientv3's `WithRequireLeader`) makes a
//!   request fail with `etcdserver: no leader` while this member knows no leader;
//! - the metrics of the call ([`crate::observe`]).

use crate::errors;
use crate::observe::GrpcMetrics;
use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// What a learner serves, as etcd: Status, serializable Range (checked in `range`), the
/// Snapshot stream, and health probes.
const LEARNER_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Maintenance/Snapshot",
];

#[derive(Clone)]
pub(crate) struct FrontLayer {
    pub(crate) raft: metastore_raft::RaftNode,
    pub(crate) is_learner: Arc<AtomicBool>,
    pub(crate) metrics: GrpcMetrics,
}

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            front: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Front<S> {
    inner: S,
    front: FrontLayer,
}

impl FrontLayer {
    fn refuse(&self, request: &http::Request<Body>) -> Option<Response> {
        if self.is_learner.load(Ordering::Acquire)
            && !LEARNER_METHODS.contains(&request.uri().path())
        {
            return Some(errors::not_supported_for_learner().into_http());
        }
        let asked = request
            .headers()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        if asked && self.raft.status().leader_id == 0 {
            return Some(errors::no_leader().into_http());
        }
        None
    }
}

impl<S> tower::Service<http::Request<Body>> for Front<S>
where
    S: tower::Service<http::Request<Body>, Response = Response, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // Only a verified certificate may name the caller, never a header a client sent.
        let headers = request.headers_mut();
        headers.remove(crate::auth::TLS_COMMON_NAME_HEADER);
        let common_name = request
            .extensions()
            .get::<crate::auth::TlsClient>()
            .and_then(|c| c.common_name.clone())
            .and_then(|cn| http::HeaderValue::from_str(&cn).ok());
        if let Some(cn) = common_name {
            request
                .headers_mut()
                .insert(crate::auth::TLS_COMMON_NAME_HEADER, cn);
        }
        if let Some(refusal) = self.front.refuse(&request) {
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        let Some(pending) = self.front.metrics.start(&mut request) else {
            return Box::pin(self.inner.call(request));
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(pending.answered(response))
        })
    }
}
