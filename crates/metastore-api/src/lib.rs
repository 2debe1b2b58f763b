//! etcd v3 gRPC services over MetaStore's state machine and raft node.
//!
//! A write is validated, wrapped in a [`Command`], handed to the batch proposer, replicated,
//! applied by [`apply::ApplyDriver`] and answered with the result the state machine produced.
//! A read is served from the local store, after a ReadIndex barrier unless it is serializable.

pub mod apply;
pub mod auth;
mod backup;
mod batch;
pub mod cluster_version;
pub mod compactor;
mod concurrency;
pub mod errors;
pub mod forward;
mod front;
pub mod gateway;
pub mod http;
pub mod lease;
mod members;
mod membership;
pub mod observe;
mod offload;
mod quota;
mod services;
mod slowlog;
pub mod validate;
mod watch;

use metastore_batch::{BatchConfig, BatchProposer};
use metastore_engine::Engine;
use metastore_mvcc::{ApplyResponse, MvccError, Store};
use metastore_proto::etcdserverpb::ResponseHeader;
use metastore_proto::internal::{command::Op, Command};
use metastore_raft::RaftNode;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

pub use auth::AuthConfig;
pub use batch::MAX_BATCH_OPS;
pub use lease::LeaseConfig;

pub use services::{routes, witness_routes, UNIMPLEMENTED_SERVICES, WITNESS_SERVES_NO_CLIENTS};

/// The etcd API version we answer to (what `etcdctl endpoint status` shows as version).
pub const ETCD_API_VERSION: &str = "3.5.0";

pub type CommandResult = Result<ApplyResponse, MvccError>;

/// Request limits; defaults are etcd's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Limits {
    /// Largest write request accepted (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most operations in one txn branch (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Storage size above which writes that add data are refused and the NOSPACE alarm is
    /// raised (etcd's `--quota-backend-bytes`); 0 = the default.
    pub quota_backend_bytes: u64,
    /// Bytes of responses queued for one watch stream (see `metastore_mvcc::WatchLimits`).
    pub watch_stream_queue_bytes: usize,
    /// Most watchers on one watch stream.
    pub max_watchers_per_stream: usize,
    /// Bytes of responses queued for all watch streams together.
    pub watch_total_queue_bytes: usize,
    /// Largest Range response: a range whose key-values pass it is refused as soon as they do,
    /// with grpc-go's "trying to send message larger than max" (etcd's send limit is 2 GiB).
    pub max_response_bytes: usize,
}

/// etcd's default backend quota.
/// etcd's `maxGapBetweenApplyAndCommitIndex`: how far committed may run ahead of applied
/// before a member answers new requests with `etcdserver: too many requests`.
pub const MAX_APPLY_LAG_ENTRIES: u64 = 5000;

pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            quota_backend_bytes: DEFAULT_QUOTA_BYTES,
            watch_stream_queue_bytes: metastore_mvcc::WatchLimits::default().stream_queue_bytes,
            max_watchers_per_stream: metastore_mvcc::WatchLimits::default().watchers_per_stream,
            watch_total_queue_bytes: metastore_mvcc::WatchLimits::default().total_queue_bytes,
            max_response_bytes: i32::MAX as usize,
        }
    }
}

impl Limits {
    /// The backend quota in force (0 configured means etcd's default).
    pub fn quota_bytes(&self) -> u64 {
        match self.quota_backend_bytes {
            0 => DEFAULT_QUOTA_BYTES,
            q => q,
        }
    }
}

/// Who this member is. The other members are in the replicated member table
/// (`Store::members`).
#[derive(Clone, Debug)]
pub struct ClusterInfo {
    pub cluster_id: u64,
    pub member_id: u64,
    pub name: String,
    /// What this member publishes as its client URLs.
    pub client_urls: Vec<String>,
}

/// Since when this member's stream to a peer has been up (None: not connected), as the
/// peer transport knows it: etcd's reconfiguration checks count only peers connected for a
/// while.
#[derive(Clone)]
pub struct PeerHealthSource(pub Arc<dyn Fn(u64) -> Option<std::time::Instant> + Send + Sync>);

impl Default for PeerHealthSource {
    fn default() -> Self {
        Self(Arc::new(|_| None))
    }
}

impl std::fmt::Debug for PeerHealthSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerHealthSource")
    }
}

/// The id a member added with these peer URLs gets (etcd's `computeMemberID` with the
/// cluster token and the time of the request).
#[derive(Clone)]
pub struct MemberIdSource(pub Arc<MemberIdFn>);

/// Peer URLs to a new member id.
pub type MemberIdFn = dyn Fn(&[String]) -> u64 + Send + Sync;

impl std::fmt::Debug for MemberIdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberIdSource")
    }
}

impl Default for MemberIdSource {
    fn default() -> Self {
        Self(Arc::new(|urls| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            urls.hash(&mut h);
            std::time::SystemTime::now().hash(&mut h);
            h.finish()
        }))
    }
}

/// Whether a member announced itself a witness (the peer transport knows).
#[derive(Clone)]
pub struct WitnessSource(pub Arc<dyn Fn(u64) -> bool + Send + Sync>);

impl Default for WitnessSource {
    fn default() -> Self {
        Self(Arc::new(|_| false))
    }
}

impl std::fmt::Debug for WitnessSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WitnessSource")
    }
}

/// Membership rules (etcd's flags of the same names).
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// `--strict-reconfig-check`: refuse a change that could cost the quorum.
    pub strict_reconfig_check: bool,
    /// `--max-learners`.
    pub max_learners: usize,
    pub peer_health: PeerHealthSource,
    pub new_member_id: MemberIdSource,
    pub witnesses: WitnessSource,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            strict_reconfig_check: true,
            max_learners: 1,
            peer_health: PeerHealthSource::default(),
            new_member_id: MemberIdSource::default(),
            witnesses: WitnessSource::default(),
        }
    }
}

/// Where the version a peer announced comes from (the peer transport); None: not heard yet.
#[derive(Clone)]
pub struct PeerVersionSource(pub Arc<dyn Fn(u64) -> Option<String> + Send + Sync>);

impl std::fmt::Debug for PeerVersionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerVersionSource")
    }
}

impl Default for PeerVersionSource {
    fn default() -> Self {
        Self(Arc::new(|_| None))
    }
}

/// Service settings beyond etcd's request limits.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub lease: LeaseConfig,
    /// Interval of watch progress notifications (etcd: 10 min).
    pub watch_progress_interval: Duration,
    /// Raft election timeout: a new leader extends every lease by it, as etcd does.
    pub election_timeout: Duration,
    /// The versions peers announced, for the cluster version.
    pub peer_versions: PeerVersionSource,
    pub membership: MembershipConfig,
    /// Origins allowed to call the HTTP endpoints from a browser (etcd's `--cors`).
    pub cors: http::Cors,
    /// etcd's `--metrics extensive`: also record per-method gRPC latency histograms.
    pub extensive_metrics: bool,
    /// KV requests slower than this are logged (etcd's `--experimental-warning-apply-duration`).
    pub warning_apply_duration: Duration,
    /// Where `Maintenance.Snapshot` writes its file before streaming it (the member's
    /// directory; None: the system's temporary directory).
    pub snapshot_dir: Option<std::path::PathBuf>,
    pub auth: AuthConfig,
    /// How forwarded calls reach the leader's client URL.
    pub dialer: forward::Dialer,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            lease: LeaseConfig::default(),
            watch_progress_interval: Duration::from_secs(600),
            election_timeout: Duration::from_secs(1),
            peer_versions: PeerVersionSource::default(),
            membership: MembershipConfig::default(),
            cors: http::Cors::default(),
            extensive_metrics: false,
            warning_apply_duration: Duration::from_millis(100),
            snapshot_dir: None,
            auth: AuthConfig::default(),
            dialer: forward::Dialer::default(),
        }
    }
}

/// Runs `task` once the log present at start has been re-applied (state derived from the
/// replicated log is only current then), holding the server weakly so the task ends with it.
pub(crate) fn spawn_after_replay<E, F, Fut>(server: std::sync::Weak<EtcdServer<E>>, task: F)
where
    E: Engine,
    F: FnOnce(std::sync::Weak<EtcdServer<E>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let raft = match server.upgrade() {
            Some(s) => s.raft.clone(),
            None => return,
        };
        if raft.wait_replayed().await.is_err() {
            return;
        }
        drop(raft);
        task(server).await;
    });
}

/// Everything the services share.
pub struct EtcdServer<E: Engine> {
    pub store: Arc<Store<E>>,
    pub raft: RaftNode,
    pub proposer: BatchProposer<CommandResult>,
    pub limits: Limits,
    pub cluster: ClusterInfo,
    pub lease_config: LeaseConfig,
    pub watch_progress_interval: Duration,
    lease_clock: lease::LeaseClock,
    leader_channel: forward::LeaderChannel,
    peer_versions: PeerVersionSource,
    membership_config: MembershipConfig,
    /// One membership change at a time on this member (the leader).
    membership_lock: tokio::sync::Mutex<()>,
    /// This member is a learner: it serves only what etcd lets a learner serve.
    is_learner: Arc<std::sync::atomic::AtomicBool>,
    election_timeout: Duration,
    /// `grpc.health.v1.Health`'s statuses: serving from start to shutdown, as etcd.
    pub grpc_health: tonic_health::server::HealthReporter,
    pub(crate) cors: http::Cors,
    pub(crate) extensive_metrics: bool,
    pub(crate) warning_apply_duration: Duration,
    pub(crate) snapshot_dir: Option<std::path::PathBuf>,
    pub(crate) auth_config: AuthConfig,
    pub(crate) dialer: forward::Dialer,
    /// The JWT keys when `--auth-token jwt,...` (else simple tokens).
    pub(crate) jwt: Option<auth::JwtKeys>,
    storage_size: quota::SizeCache,
}

impl<E: Engine> EtcdServer<E> {
    /// Wires the proposer to the raft node and the apply driver's completer.
    pub fn new(
        store: Arc<Store<E>>,
        raft: RaftNode,
        completer_slot: apply::CompleterSlot,
        batch: BatchConfig,
        limits: Limits,
        cluster: ClusterInfo,
        services: ServiceConfig,
    ) -> Arc<Self> {
        let proposer = BatchProposer::start_on_member(
            batch,
            Arc::new(apply::RaftSink(raft.clone())),
            cluster.member_id,
        );
        completer_slot.set(proposer.completer());
        // A write whose term ended fails at once with `etcdserver: leader changed` (it may
        // still commit under the next leader), instead of holding its slot until the request
        // timeout: writes resume as soon as a new leader is elected.
        let mut leadership = raft.leadership();
        let completer = proposer.completer();
        tokio::spawn(async move {
            while leadership.changed().await.is_ok() {
                let (term, leader) = *leadership.borrow_and_update();
                completer.fail_stale(term, leader == 0);
            }
        });
        let server = Arc::new(Self {
            store,
            raft,
            proposer,
            limits,
            cluster,
            lease_config: services.lease.clone(),
            watch_progress_interval: services.watch_progress_interval,
            lease_clock: lease::LeaseClock::default(),
            leader_channel: forward::LeaderChannel::default(),
            peer_versions: services.peer_versions.clone(),
            membership_config: services.membership.clone(),
            membership_lock: tokio::sync::Mutex::new(()),
            is_learner: Arc::default(),
            election_timeout: services.election_timeout,
            grpc_health: tonic_health::server::HealthReporter::new(),
            cors: services.cors.clone(),
            extensive_metrics: services.extensive_metrics,
            warning_apply_duration: services.warning_apply_duration,
            snapshot_dir: services.snapshot_dir.clone(),
            auth_config: services.auth.clone(),
            dialer: services.dialer.clone(),
            jwt: services.auth.jwt.as_ref().and_then(|cfg| {
                auth::JwtKeys::new(cfg)
                    .map_err(
                        |e| tracing::error!(error = %e, "JWT keys do not load; tokens are refused"),
                    )
                    .ok()
            }),
            storage_size: quota::SizeCache::default(),
        });
        server.store.auth().set_token_ttl(services.auth.token_ttl);
        server
            .store
            .set_apply_response_limit(server.limits.max_response_bytes);
        server
            .store
            .watch_hub()
            .set_limits(metastore_mvcc::WatchLimits {
                stream_queue_bytes: server.limits.watch_stream_queue_bytes,
                watchers_per_stream: server.limits.max_watchers_per_stream,
                total_queue_bytes: server.limits.watch_total_queue_bytes,
            });
        membership::spawn_learner_flag(&server);
        lease::spawn_lease_clock(Arc::downgrade(&server), services.election_timeout);
        cluster_version::spawn_cluster_version_monitor(Arc::downgrade(&server));
        members::spawn_attr_publisher(Arc::downgrade(&server));
        server
    }

    /// Replicates one of the members' own commands (never checked against permissions) and
    /// returns what the state machine answered.
    pub async fn submit(&self, op: Op) -> Result<ApplyResponse, Status> {
        self.submit_as(op, None).await
    }

    /// Replicates a command; a client's carries `auth` (who asked), checked when applied.
    pub async fn submit_as(
        &self,
        op: Op,
        auth: Option<metastore_proto::internal::AuthHeader>,
    ) -> Result<ApplyResponse, Status> {
        let cmd = Command { auth, op: Some(op) };
        let encoded_len = cmd.encoded_len();
        if encoded_len > self.limits.max_request_bytes {
            return Err(errors::request_too_large());
        }
        // etcd's admission check: a member whose applying lags its committing this far takes
        // no more work until it has caught up.
        // The same when the entries waiting to be applied pass their byte bound (raft's
        // `max-apply-backlog-bytes`), whatever their count.
        let raft = self.raft.status();
        if raft.commit_index > raft.applied_index + MAX_APPLY_LAG_ENTRIES || raft.apply_held {
            metrics::counter!("metastore_requests_refused_total", "reason" => "apply_lag")
                .increment(1);
            return Err(errors::too_many_requests());
        }
        if metastore_mvcc::adds_data(&cmd) {
            let quota = self.limits.quota_bytes();
            let read = || self.store.engine().size_bytes();
            let cost = encoded_len as u64;
            // etcd: available while size + cost < quota. The estimate errs high; refuse only
            // on a fresh read.
            let estimate = self.storage_size.estimate(read, cost) + cost;
            let over = if estimate >= quota {
                let size = self.storage_size.fresh(read) + cost;
                (size >= quota).then_some(size)
            } else {
                None
            };
            if let Some(size) = over {
                if !self.store.is_space_capped() {
                    // As etcd: raise NOSPACE through raft, so every member refuses writes.
                    let alarm = metastore_proto::etcdserverpb::AlarmRequest {
                        action: metastore_proto::etcdserverpb::alarm_request::AlarmAction::Activate
                            as i32,
                        member_id: self.cluster.member_id,
                        alarm: metastore_proto::etcdserverpb::AlarmType::Nospace as i32,
                    };
                    tracing::warn!(
                        size,
                        quota,
                        "storage quota exceeded; raising the NOSPACE alarm"
                    );
                    let _ = self
                        .proposer
                        .submit(Command {
                            auth: None,
                            op: Some(Op::Alarm(alarm)),
                        })
                        .await;
                }
                return Err(errors::no_space());
            }
        }
        let result = self
            .proposer
            .submit_encoded(cmd, encoded_len)
            .await
            .map_err(errors::from_batch)?;
        result.map_err(errors::from_mvcc)
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster.cluster_id,
            member_id: self.cluster.member_id,
            revision,
            raft_term: self.raft.term(),
        }
    }

    /// Completes a header the state machine filled with only a revision.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map(|h| h.revision).unwrap_or_default();
        *header = Some(self.header(revision));
    }
}
