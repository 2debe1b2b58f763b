//! The tonic service implementations and the route table.

use crate::membership::Change;
use crate::slowlog::{Asked, SlowLog};
use crate::{errors, validate, EtcdServer, ETCD_API_VERSION};
use futures::stream::BoxStream;
use metastore_engine::Engine;
use metastore_mvcc::auth::AuthInfo;
use metastore_mvcc::{ApplyResponse, Store};
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, cluster_server::Cluster, cluster_server::ClusterServer,
    kv_server::Kv, kv_server::KvServer, maintenance_server::Maintenance,
    maintenance_server::MaintenanceServer, AlarmRequest, AlarmResponse, AlarmType,
    CompactionRequest, CompactionResponse, DefragmentRequest, DefragmentResponse,
    DeleteRangeRequest, DeleteRangeResponse, DowngradeRequest, DowngradeResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
    MoveLeaderRequest, MoveLeaderResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use metastore_proto::etcdserverpb::{lease_server::LeaseServer, watch_server::WatchServer};
use metastore_proto::internal::command::Op;
use metastore_proto::metastore::v1::batch_server::BatchServer;
use metastore_proto::v3electionpb::election_server::ElectionServer;
use metastore_proto::v3lockpb::lock_server::LockServer;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// gRPC services not served yet: any call to them answers `Unimplemented` with a message that
/// says so (the README lists them too).
pub const UNIMPLEMENTED_SERVICES: &[&str] = &[];

/// gRPC allows this much above the request limit, as etcd does, so that an oversized request
/// reaches our check and gets etcd's "request is too large" instead of a transport error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// etcd's Cluster service answers headers without a revision (its `ClusterServer.header`):
/// membership is not part of the key space's history.
const CLUSTER_HEADER_REVISION: i64 = 0;

/// How long a linearizable read waits for its ReadIndex barrier.
const READ_TIMEOUT: Duration = Duration::from_secs(7);

pub(crate) struct Svc<E: Engine>(pub(crate) Arc<EtcdServer<E>>);

impl<E: Engine> Clone for Svc<E> {
    fn clone(&self) -> Self {
        Svc(self.0.clone())
    }
}

/// All services in one route table, with an `Unimplemented` fallback for everything else.
/// The JSON gateway calls the services through `gateway` (see
/// [`crate::gateway::in_process_channel`]).
pub fn routes<E: Engine>(
    server: Arc<EtcdServer<E>>,
    gateway: tonic::transport::Channel,
) -> tonic::service::Routes {
    let limit = server.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let front = crate::front::FrontLayer {
        raft: server.raft.clone(),
        is_learner: server.is_learner.clone(),
        metrics: crate::observe::GrpcMetrics::new(
            server.store.engine().name(),
            server.extensive_metrics,
        ),
    };
    let http = crate::http::http_routes(server.clone())
        .merge(crate::gateway::gateway_routes(gateway))
        .layer(axum::middleware::from_fn_with_state(
            server.cors.clone(),
            crate::http::cors,
        ));
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(server.grpc_health.clone()),
    );
    let svc = Svc(server);
    let router = tonic::service::Routes::new(
        KvServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        MaintenanceServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(ClusterServer::new(svc.clone()).max_decoding_message_size(limit))
    .add_service(
        metastore_proto::etcdserverpb::auth_server::AuthServer::new(svc.clone())
            .max_decoding_message_size(limit),
    )
    .add_service(
        WatchServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(LeaseServer::new(svc.clone()).max_decoding_message_size(limit))
    .add_service(ElectionServer::new(svc.clone()).max_decoding_message_size(limit))
    .add_service(LockServer::new(svc.clone()).max_decoding_message_size(limit))
    .add_service(
        BatchServer::new(svc)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(health)
    .into_axum_router()
    .fallback(unimplemented_fallback)
    .layer(front)
    // Probes and scrapes are answered by a learner too, and outside the gRPC gate.
    .merge(http);
    tonic::service::Routes::from(router)
}

/// What a witness answers every client request.
pub const WITNESS_SERVES_NO_CLIENTS: &str =
    "metastore: this member is a witness: it votes and keeps the raft log but holds no data and serves no clients; use a data member's endpoint";

/// The client port of a witness: every request gets `WITNESS_SERVES_NO_CLIENTS`.
pub fn witness_routes() -> tonic::service::Routes {
    async fn refuse() -> axum::response::Response {
        Status::unavailable(WITNESS_SERVES_NO_CLIENTS).into_http()
    }
    let router = axum::Router::new().fallback(refuse);
    tonic::service::Routes::from(router)
}

async fn unimplemented_fallback(uri: http::Uri) -> axum::response::Response {
    let path = uri.path();
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    let message = if UNIMPLEMENTED_SERVICES.contains(&service) {
        format!("metastore: the {service} service is not implemented yet ({path}); see the README's compatibility table")
    } else {
        format!("metastore: unknown gRPC method {path}")
    };
    Status::unimplemented(message).into_http()
}

impl<E: Engine> Svc<E> {
    /// Proposes a client's command, with who asked (checked again when applied).
    async fn propose(&self, op: Op, who: Option<&AuthInfo>) -> Result<ApplyResponse, Status> {
        self.0
            .submit_as(op, Some(EtcdServer::<E>::auth_header(who)))
            .await
    }

    async fn serve_range(
        &self,
        req: &RangeRequest,
        who: Option<&AuthInfo>,
    ) -> Result<RangeResponse, Status> {
        self.0.check_read(who, &req.key, &req.range_end)?;
        self.read_barrier(req.serializable).await?;
        let limit = self.0.limits.max_response_bytes;
        let mut resp = if crate::offload::range_may_be_large(req) {
            let (store, req) = (self.0.store.clone(), req.clone());
            crate::offload::read(true, move || store.range_bounded(&req, limit)).await
        } else {
            self.0.store.range_bounded(req, limit)
        }
        .map_err(errors::from_mvcc)?;
        self.0.recheck_revision(who)?;
        self.0.fill_header(&mut resp.header);
        Ok(resp)
    }

    async fn serve_txn(
        &self,
        req: TxnRequest,
        read_only: bool,
        who: Option<&AuthInfo>,
    ) -> Result<TxnResponse, Status> {
        let mut resp = if read_only {
            if self.0.store.auth().is_enabled() {
                self.0
                    .store
                    .check_txn_auth(who.unwrap_or(&AuthInfo::default()), &req)
                    .map_err(errors::from_mvcc)?;
            }
            self.read_barrier(validate::txn_is_serializable(&req))
                .await?;
            let (store, limit) = (self.0.store.clone(), self.0.limits.max_response_bytes);
            let large = crate::offload::txn_may_be_large(&req);
            let resp = crate::offload::read(large, move || store.read_txn_bounded(&req, limit))
                .await
                .map_err(errors::from_mvcc)?;
            self.0.recheck_revision(who)?;
            resp
        } else {
            match self.propose(Op::Txn(req), who).await? {
                ApplyResponse::Txn(resp) => resp,
                _ => return Err(unexpected("txn")),
            }
        };
        // As etcd: only the outer header carries the cluster fields.
        self.0.fill_header(&mut resp.header);
        Ok(resp)
    }

    pub(crate) async fn read_barrier(&self, serializable: bool) -> Result<(), Status> {
        if serializable {
            return Ok(());
        }
        match tokio::time::timeout(READ_TIMEOUT, self.0.raft.linearizable_barrier()).await {
            Ok(r) => r.map_err(errors::from_raft),
            Err(_) => Err(errors::timeout()),
        }
    }
}

pub(crate) fn unexpected(what: &str) -> Status {
    Status::internal(format!(
        "metastore: state machine answered a {what} request with another kind"
    ))
}

#[tonic::async_trait]
impl<E: Engine> Kv for Svc<E> {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        validate::check_range(&req)?;
        if !req.serializable && self.0.is_learner() {
            return Err(errors::not_supported_for_learner());
        }
        let slow = SlowLog::start(self.0.warning_apply_duration);
        let answer = self.serve_range(&req, who.as_ref()).await;
        slow.finish(
            "read-only range ",
            || Asked::Range {
                key: req.key.clone(),
                range_end: req.range_end.clone(),
                limit: req.limit,
                revision: req.revision,
                serializable: req.serializable,
            },
            answer.as_ref(),
            answer.as_ref().ok().map(|r| r.kvs.len()),
        );
        answer.map(Response::new)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        validate::check_put(&req)?;
        let slow = SlowLog::start(self.0.warning_apply_duration);
        let (key, value_size, lease) = (req.key.clone(), req.value.len(), req.lease);
        let answer = match self.propose(Op::Put(req), who.as_ref()).await {
            Ok(ApplyResponse::Put(mut resp)) => {
                self.0.fill_header(&mut resp.header);
                Ok(resp)
            }
            Ok(_) => Err(unexpected("put")),
            Err(e) => Err(e),
        };
        slow.finish(
            "",
            || Asked::Put {
                key,
                value_size,
                lease,
            },
            answer.as_ref(),
            None,
        );
        answer.map(Response::new)
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        validate::check_delete(&req)?;
        let slow = SlowLog::start(self.0.warning_apply_duration);
        let (key, range_end) = (req.key.clone(), req.range_end.clone());
        let answer = match self.propose(Op::DeleteRange(req), who.as_ref()).await {
            Ok(ApplyResponse::DeleteRange(mut resp)) => {
                self.0.fill_header(&mut resp.header);
                Ok(resp)
            }
            Ok(_) => Err(unexpected("delete")),
            Err(e) => Err(e),
        };
        slow.finish(
            "",
            || Asked::DeleteRange { key, range_end },
            answer.as_ref(),
            None,
        );
        answer.map(Response::new)
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        validate::check_txn(&req, self.0.limits.max_txn_ops)?;
        let slow = SlowLog::start(self.0.warning_apply_duration);
        let read_only = Store::<E>::txn_is_read_only(&req);
        let asked = Asked::Txn {
            compares: req.compare.len(),
            success: req.success.len(),
            failure: req.failure.len(),
            first_key: req.compare.first().map(|c| c.key.clone()),
        };
        let answer = self.serve_txn(req, read_only, who.as_ref()).await;
        let prefix = if read_only { "read-only txn " } else { "" };
        slow.finish(prefix, || asked, answer.as_ref(), None);
        answer.map(Response::new)
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let req = request.into_inner();
        let (revision, physical) = (req.revision, req.physical);
        match self.0.submit(Op::Compaction(req)).await? {
            ApplyResponse::Compaction(mut resp) => {
                // The apply loop only publishes the compaction; the records go in steps on
                // the compactor thread. `physical` answers once they are gone, as etcd's.
                while physical && !self.0.store.physically_compacted(revision) {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                self.0.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}

#[tonic::async_trait]
impl<E: Engine> Maintenance for Svc<E> {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        if AlarmAction::try_from(req.action) == Ok(AlarmAction::Get) {
            self.0.require_auth_info(&metadata)?;
            let alarms = self
                .0
                .store
                .alarms()
                .into_iter()
                .filter(|a| req.alarm == AlarmType::None as i32 || a.alarm == req.alarm)
                .collect();
            return Ok(Response::new(AlarmResponse {
                header: Some(self.0.header(self.0.store.current_revision())),
                alarms,
            }));
        }
        self.0.require_admin(&metadata)?;
        match self.0.submit(Op::Alarm(req)).await? {
            ApplyResponse::Alarm(mut resp) => {
                self.0.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("alarm")),
        }
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.0.require_auth_info(request.metadata())?;
        let raft = self.0.raft.status();
        let db_size = self.0.store.engine().size_bytes() as i64;
        // As etcd: a member without a leader still answers Status, and says so.
        let no_leader = (raft.leader_id == 0).then(|| errors::no_leader().message().to_string());
        Ok(Response::new(StatusResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            version: ETCD_API_VERSION.to_string(),
            db_size,
            leader: raft.leader_id,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors: self
                .0
                .store
                .alarms()
                .iter()
                .map(|a| {
                    let name = AlarmType::try_from(a.alarm)
                        .map(|t| t.as_str_name().to_string())
                        .unwrap_or_else(|_| a.alarm.to_string());
                    format!("memberID:{} alarm:{name} ", a.member_id)
                })
                .chain(no_leader)
                .collect(),
            db_size_in_use: db_size,
            is_learner: self.0.is_learner(),
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let engine = self.0.store.engine().clone();
        let started = std::time::Instant::now();
        let did = tokio::task::spawn_blocking(move || engine.defragment())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragment: {e}")))?
            .map_err(|e| Status::internal(format!("etcdserver: defragment: {e}")))?;
        if did {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "defragmented the storage engine"
            );
        } else {
            tracing::info!(
                "defragment: the {} engine keeps no free pages, nothing to do",
                self.0.store.engine().name()
            );
        }
        Ok(Response::new(DefragmentResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
        }))
    }

    /// Served from this member's state, as etcd serves it (no raft round).
    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let store = self.0.store.clone();
        let (hash, revision) = tokio::task::spawn_blocking(move || store.hash_all())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: hash: {e}")))?
            .map_err(errors::from_mvcc)?;
        Ok(Response::new(HashResponse {
            header: Some(self.0.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let revision = request.into_inner().revision;
        let store = self.0.store.clone();
        let hashed = tokio::task::spawn_blocking(move || store.hash_kv(revision))
            .await
            .map_err(|e| Status::internal(format!("etcdserver: hash: {e}")))?
            .map_err(errors::from_mvcc)?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.0.header(hashed.current_revision)),
            hash: hashed.hash,
            compact_revision: hashed.compact_revision,
        }))
    }

    type SnapshotStream = BoxStream<'static, Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.0.require_admin(request.metadata())?;
        Ok(Response::new(
            crate::backup::snapshot_stream(self.0.clone()).await?,
        ))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        self.0.move_leader(request.into_inner().target_id).await?;
        Ok(Response::new(MoveLeaderResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
        }))
    }

    async fn downgrade(
        &self,
        _request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "metastore: Maintenance.Downgrade is not implemented",
        ))
    }
}

#[tonic::async_trait]
impl<E: Engine> Cluster for Svc<E> {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let change = Change::Add {
            peer_urls: req.peer_ur_ls.clone(),
            learner: req.is_learner,
        };
        let (member, members) = self
            .0
            .change_membership(change, |mut leader| async move {
                let resp = leader
                    .member_add(crate::auth::forwarded(req, &metadata))
                    .await?
                    .into_inner();
                Ok((resp.member, resp.members))
            })
            .await?;
        Ok(Response::new(MemberAddResponse {
            header: Some(self.0.header(CLUSTER_HEADER_REVISION)),
            member,
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let (_, members) = self
            .0
            .change_membership(Change::Remove(req.id), |mut leader| async move {
                Ok((
                    None,
                    leader
                        .member_remove(crate::auth::forwarded(req, &metadata))
                        .await?
                        .into_inner()
                        .members,
                ))
            })
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.0.header(CLUSTER_HEADER_REVISION)),
            members,
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let change = Change::Update {
            id: req.id,
            peer_urls: req.peer_ur_ls.clone(),
        };
        let (_, members) = self
            .0
            .change_membership(change, |mut leader| async move {
                Ok((
                    None,
                    leader
                        .member_update(crate::auth::forwarded(req, &metadata))
                        .await?
                        .into_inner()
                        .members,
                ))
            })
            .await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.0.header(CLUSTER_HEADER_REVISION)),
            members,
        }))
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.0.require_auth_info(request.metadata())?;
        self.read_barrier(!request.get_ref().linearizable).await?;
        Ok(Response::new(MemberListResponse {
            header: Some(self.0.header(CLUSTER_HEADER_REVISION)),
            members: self.0.member_list(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let (_, members) = self
            .0
            .change_membership(Change::Promote(req.id), |mut leader| async move {
                Ok((
                    None,
                    leader
                        .member_promote(crate::auth::forwarded(req, &metadata))
                        .await?
                        .into_inner()
                        .members,
                ))
            })
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.0.header(CLUSTER_HEADER_REVISION)),
            members,
        }))
    }
}
