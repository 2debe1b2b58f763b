//! `v3lockpb.Lock` and `v3electionpb.Election`, built on KV, leases and watches exactly as
//! etcd's `clientv3/concurrency` (which etcd's own lock and election services use): a waiter's
//! key is `<name>/<lease in hex>`, attached to its lease; the oldest key by create revision holds
//! the lock (or leads); the others wait for the deletion of the key just older than theirs.

use crate::services::{unexpected, Svc};
use crate::EtcdServer;
use bytes::Bytes;
use futures::stream::BoxStream;
use metastore_engine::Engine;
use metastore_mvcc::{ApplyResponse, StreamReceiver, WatchSpec};
use metastore_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use metastore_proto::internal::command::Op;
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use metastore_proto::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub const ERR_ELECTION_NOT_LEADER: &str = "election: not leader";
pub const ERR_ELECTION_NO_LEADER: &str = "election: no leader";
pub const ERR_SESSION_EXPIRED: &str = "mutex: session is expired";
pub const ERR_MISSING_LEADER_KEY: &str = r#""leader" field must be provided"#;

fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end.into();
        }
    }
    Bytes::from_static(&[0])
}

fn waiter_key(name: &[u8], lease: i64) -> Bytes {
    let mut k = name.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k.into()
}

fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

fn get(key: Bytes) -> RangeRequest {
    RangeRequest {
        key,
        ..Default::default()
    }
}

/// `WithFirstCreate` / `WithLastCreate` on a prefix: the oldest (or newest) key by create
/// revision, optionally at most `max_create`.
fn by_create(prefix: &[u8], order: range_request::SortOrder, max_create: i64) -> RangeRequest {
    RangeRequest {
        key: Bytes::copy_from_slice(prefix),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: range_request::SortTarget::Create as i32,
        max_create_revision: max_create,
        ..Default::default()
    }
}

fn create_rev_is(key: &Bytes, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        range_end: Bytes::new(),
    }
}

fn range_response(resp: &TxnResponse, i: usize) -> Option<&RangeResponse> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => Some(r),
        _ => None,
    }
}

fn unknown(msg: &str) -> Status {
    Status::unknown(msg)
}

/// etcd's lock and election services work through an internal client, whose errors reach the
/// caller as plain errors: gRPC `Unknown` with etcd's text.
fn as_client_error(s: Status) -> Status {
    if s.code() == tonic::Code::Unknown {
        s
    } else {
        Status::unknown(s.message())
    }
}

/// TTL of the session lease granted when a lock or campaign names no lease (etcd's default
/// session TTL).
const SESSION_TTL: i64 = 60;

/// A watch on the store that the service consumes itself; closed when dropped.
struct InternalWatch<E: Engine> {
    server: Arc<EtcdServer<E>>,
    stream: u64,
    rx: StreamReceiver,
}

impl<E: Engine> InternalWatch<E> {
    fn new(server: &Arc<EtcdServer<E>>, key: Bytes, range_end: Bytes, start_revision: i64) -> Self {
        let (stream, rx) = server.store.open_watch_stream();
        server.store.watch(
            stream,
            WatchSpec {
                key,
                range_end,
                start_revision,
                ..Default::default()
            },
        );
        Self {
            server: server.clone(),
            stream,
            rx,
        }
    }

    /// The next batch of events, with the header revision they came with.
    async fn next(&mut self) -> Result<(i64, Vec<Event>), Status> {
        loop {
            // Taken off the queue as soon as it is read: nothing holds it further.
            let (msg, _slot) = self
                .rx
                .recv()
                .await
                .ok_or_else(|| Status::unavailable("etcdserver: watch closed"))?;
            if msg.canceled {
                return Err(Status::unavailable(format!(
                    "etcdserver: internal watch canceled ({})",
                    if msg.compact_revision != 0 {
                        "compacted"
                    } else {
                        msg.cancel_reason.as_str()
                    }
                )));
            }
            if !msg.events.is_empty() {
                let rev = msg.header.map(|h| h.revision).unwrap_or_default();
                return Ok((rev, msg.events));
            }
        }
    }
}

impl<E: Engine> Drop for InternalWatch<E> {
    fn drop(&mut self) {
        self.server.store.watch_hub().close_stream(self.stream);
    }
}

impl<E: Engine> EtcdServer<E> {
    /// etcd's `NewSession`: lease 0 means a fresh lease of the default session TTL, which the
    /// service then leaves to the client (orphaned: nobody keeps it alive).
    async fn session_lease(self: &Arc<Self>, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let id = self.fresh_lease_id();
        match self
            .submit(Op::LeaseGrant(
                metastore_proto::etcdserverpb::LeaseGrantRequest {
                    ttl: SESSION_TTL,
                    id,
                },
            ))
            .await?
        {
            ApplyResponse::LeaseGrant(_) => {
                self.track_lease(id, SESSION_TTL);
                Ok(id)
            }
            _ => Err(unexpected("lease grant")),
        }
    }

    async fn txn(self: &Arc<Self>, txn: TxnRequest) -> Result<TxnResponse, Status> {
        let who = crate::auth::caller();
        let header = Self::auth_header(who.as_ref());
        match self.submit_as(Op::Txn(txn), Some(header)).await? {
            ApplyResponse::Txn(resp) => Ok(resp),
            _ => Err(unexpected("txn")),
        }
    }

    fn read(&self, req: &RangeRequest) -> Result<RangeResponse, Status> {
        self.check_read(crate::auth::caller().as_ref(), &req.key, &req.range_end)?;
        self.store.range(req).map_err(crate::errors::from_mvcc)
    }

    /// etcd's `waitDelete`: returns once `key` is deleted at or after `rev`.
    async fn wait_delete(self: &Arc<Self>, key: Bytes, rev: i64) -> Result<(), Status> {
        let mut watch = InternalWatch::new(self, key, Bytes::new(), rev);
        loop {
            let (_, events) = watch.next().await?;
            if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                return Ok(());
            }
        }
    }

    /// etcd's `waitDeletes`: waits until no key under `prefix` has a create revision at or
    /// below `max_create`.
    async fn wait_deletes(
        self: &Arc<Self>,
        prefix: &[u8],
        max_create: i64,
    ) -> Result<ResponseHeader, Status> {
        loop {
            let resp = self.read(&by_create(
                prefix,
                range_request::SortOrder::Descend,
                max_create,
            ))?;
            let header = resp.header.unwrap_or_default();
            let Some(kv) = resp.kvs.into_iter().next() else {
                return Ok(self.header(header.revision));
            };
            self.wait_delete(kv.key, header.revision).await?;
        }
    }

    async fn delete_key(self: &Arc<Self>, key: Bytes) -> Result<ResponseHeader, Status> {
        let header = Self::auth_header(crate::auth::caller().as_ref());
        match self
            .submit_as(
                Op::DeleteRange(DeleteRangeRequest {
                    key,
                    range_end: Bytes::new(),
                    prev_kv: false,
                }),
                Some(header),
            )
            .await?
        {
            ApplyResponse::DeleteRange(r) => {
                Ok(self.header(r.header.map(|h| h.revision).unwrap_or_default()))
            }
            _ => Err(unexpected("delete")),
        }
    }

    /// Puts `<name>/<lease>` (or finds it), then waits until it is the oldest under the prefix.
    /// Returns the header, the key and its create revision. `proclaim_value` is the election's
    /// value (re-proclaimed if the key existed with another one).
    async fn acquire(
        self: &Arc<Self>,
        name: &[u8],
        lease: i64,
        value: Bytes,
        election: bool,
        guard: &mut CleanupOnDrop<E>,
    ) -> Result<(ResponseHeader, Bytes, i64), Status> {
        let mut prefix = name.to_vec();
        prefix.push(b'/');
        let key = waiter_key(name, lease);
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease,
                ..Default::default()
            })),
        };
        let owner = range_op(by_create(&prefix, range_request::SortOrder::Ascend, 0));
        let txn = TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: if election {
                vec![put]
            } else {
                vec![put, owner.clone()]
            },
            failure: if election {
                vec![range_op(get(key.clone()))]
            } else {
                vec![range_op(get(key.clone())), owner]
            },
        };
        let resp = self.txn(txn).await?;
        // From here the waiter key is ours: if the client goes away, it goes too.
        guard.key = Some(key.clone());
        let mut my_rev = resp.header.as_ref().map(|h| h.revision).unwrap_or_default();
        if !resp.succeeded {
            let existing = range_response(&resp, 0)
                .and_then(|r| r.kvs.first())
                .cloned()
                .ok_or_else(|| Status::internal("metastore: waiter key vanished"))?;
            my_rev = existing.create_revision;
            if election && existing.value != value {
                self.proclaim(&key, my_rev, lease, value.clone()).await?;
            }
        }
        if !election {
            let holder = range_response(&resp, 1).and_then(|r| r.kvs.first());
            if holder.is_none_or(|kv| kv.create_revision == my_rev) {
                return Ok((
                    self.header(resp.header.map(|h| h.revision).unwrap_or_default()),
                    key,
                    my_rev,
                ));
            }
        }
        let waited = self.wait_deletes(&prefix, my_rev - 1).await;
        if let Err(e) = waited {
            if !election {
                // etcd's Mutex.Lock unlocks on a failed wait; Campaign resigns only when the
                // client gives up (the guard's job).
                let _ = self.delete_key(key.clone()).await;
            }
            guard.key = None;
            return Err(e);
        }
        // The lease may have expired while we waited.
        let mine = self.read(&get(key.clone()))?;
        if mine.kvs.is_empty() {
            return Err(unknown(ERR_SESSION_EXPIRED));
        }
        Ok((
            self.header(mine.header.map(|h| h.revision).unwrap_or_default()),
            key,
            my_rev,
        ))
    }

    async fn proclaim(
        self: &Arc<Self>,
        key: &Bytes,
        rev: i64,
        lease: i64,
        value: Bytes,
    ) -> Result<ResponseHeader, Status> {
        let txn = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value,
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let resp = self.txn(txn).await?;
        if !resp.succeeded {
            return Err(unknown(ERR_ELECTION_NOT_LEADER));
        }
        Ok(self.header(resp.header.map(|h| h.revision).unwrap_or_default()))
    }
}

/// Deletes the waiter key if the request is dropped (client gone) before it completes.
struct CleanupOnDrop<E: Engine> {
    server: Arc<EtcdServer<E>>,
    key: Option<Bytes>,
}

impl<E: Engine> Drop for CleanupOnDrop<E> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let server = self.server.clone();
            tokio::spawn(async move {
                let _ = server.delete_key(key).await;
            });
        }
    }
}

#[tonic::async_trait]
impl<E: Engine> Lock for Svc<E> {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let req = request.into_inner();
                let lease = self
                    .0
                    .session_lease(req.lease)
                    .await
                    .map_err(as_client_error)?;
                let mut guard = CleanupOnDrop {
                    server: self.0.clone(),
                    key: None,
                };
                let (header, key, _) = self
                    .0
                    .acquire(&req.name, lease, Bytes::new(), false, &mut guard)
                    .await
                    .map_err(as_client_error)?;
                guard.key = None;
                Ok(Response::new(LockResponse {
                    header: Some(header),
                    key,
                }))
            })
            .await
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let header = self
                    .0
                    .delete_key(request.into_inner().key)
                    .await
                    .map_err(as_client_error)?;
                Ok(Response::new(UnlockResponse {
                    header: Some(header),
                }))
            })
            .await
    }
}

#[tonic::async_trait]
impl<E: Engine> Election for Svc<E> {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let req = request.into_inner();
                let lease = self
                    .0
                    .session_lease(req.lease)
                    .await
                    .map_err(as_client_error)?;
                let mut guard = CleanupOnDrop {
                    server: self.0.clone(),
                    key: None,
                };
                let (header, key, rev) = self
                    .0
                    .acquire(&req.name, lease, req.value, true, &mut guard)
                    .await
                    .map_err(as_client_error)?;
                guard.key = None;
                Ok(Response::new(CampaignResponse {
                    header: Some(header),
                    leader: Some(LeaderKey {
                        name: req.name,
                        key,
                        rev,
                        lease,
                    }),
                }))
            })
            .await
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let req = request.into_inner();
                let leader = req.leader.ok_or_else(|| unknown(ERR_MISSING_LEADER_KEY))?;
                let header = self
                    .0
                    .proclaim(&leader.key, leader.rev, leader.lease, req.value)
                    .await
                    .map_err(as_client_error)?;
                Ok(Response::new(ProclaimResponse {
                    header: Some(header),
                }))
            })
            .await
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let req = request.into_inner();
                self.read_barrier(false).await.map_err(as_client_error)?;
                let mut prefix = req.name.to_vec();
                prefix.push(b'/');
                let resp = self
                    .0
                    .read(&by_create(&prefix, range_request::SortOrder::Ascend, 0))
                    .map_err(as_client_error)?;
                let kv = resp
                    .kvs
                    .into_iter()
                    .next()
                    .ok_or_else(|| unknown(ERR_ELECTION_NO_LEADER))?;
                Ok(Response::new(LeaderResponse {
                    header: Some(
                        self.0
                            .header(resp.header.map(|h| h.revision).unwrap_or_default()),
                    ),
                    kv: Some(kv),
                }))
            })
            .await
    }

    type ObserveStream = BoxStream<'static, Result<LeaderResponse, Status>>;

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        // etcd observes through a get and a watch on the election's prefix: READ on it.
        let who = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        let prefix = [&req.name[..], b"/"].concat();
        self.0
            .check_read(who.as_ref(), &prefix, &prefix_end(&prefix))?;
        let server = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            if let Err(e) = observe(server, req.name, tx.clone()).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        crate::auth::CALLER
            .scope(who, async move {
                let req = request.into_inner();
                let leader = req.leader.ok_or_else(|| unknown(ERR_MISSING_LEADER_KEY))?;
                let txn = TxnRequest {
                    compare: vec![create_rev_is(&leader.key, leader.rev)],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            DeleteRangeRequest {
                                key: leader.key.clone(),
                                range_end: Bytes::new(),
                                prev_kv: false,
                            },
                        )),
                    }],
                    failure: vec![],
                };
                let resp = self.0.txn(txn).await.map_err(as_client_error)?;
                Ok(Response::new(ResignResponse {
                    header: Some(
                        self.0
                            .header(resp.header.map(|h| h.revision).unwrap_or_default()),
                    ),
                }))
            })
            .await
    }
}

/// etcd's `Election.observe`: the current leader, then every change of its value, then the next
/// leader when it resigns or its lease ends; until the client goes away.
async fn observe<E: Engine>(
    server: Arc<EtcdServer<E>>,
    name: Bytes,
    tx: mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let send = |rev: i64, kv: KeyValue| {
        let server = server.clone();
        let tx = tx.clone();
        async move {
            tx.send(Ok(LeaderResponse {
                header: Some(server.header(rev)),
                kv: Some(kv),
            }))
            .await
            .is_ok()
        }
    };
    loop {
        let resp = server.read(&by_create(&prefix, range_request::SortOrder::Ascend, 0))?;
        let rev = resp.header.map(|h| h.revision).unwrap_or_default();
        let (mut rev, kv) = match resp.kvs.into_iter().next() {
            Some(kv) => (rev, kv),
            None => {
                // Wait for the first put under the prefix.
                let mut watch = InternalWatch::new(
                    &server,
                    Bytes::from(prefix.clone()),
                    prefix_end(&prefix),
                    rev + 1,
                );
                loop {
                    let (_, events) = watch.next().await?;
                    if let Some(kv) = events
                        .into_iter()
                        .find(|e| e.r#type == EventType::Put as i32)
                        .and_then(|e| e.kv)
                    {
                        break (kv.mod_revision, kv);
                    }
                }
            }
        };
        let key = kv.key.clone();
        if !send(rev, kv).await {
            return Ok(());
        }
        let mut watch = InternalWatch::new(&server, key, Bytes::new(), rev + 1);
        'leader: loop {
            let (hdr_rev, events) = watch.next().await?;
            for ev in events {
                if ev.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                if let Some(kv) = ev.kv {
                    rev = hdr_rev;
                    if !send(rev, kv).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}
