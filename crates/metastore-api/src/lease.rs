//! `etcdserverpb.Lease` and the leader's lease clock.
//!
//! The lease *state* (which leases exist, their keys, checkpointed remaining TTLs) is replicated
//! in the store. *Time* is the leader's alone: it keeps a deadline per lease, renews deadlines on
//! keep-alive, revokes expired leases through Raft (so every member deletes the same keys at the
//! same revision), and periodically checkpoints remaining TTLs through Raft, so that a restart or
//! a new leader resumes from the remaining TTL instead of the full one — etcd's lease
//! checkpointing.

use crate::services::Svc;
use crate::{errors, EtcdServer};
use futures::stream::BoxStream;
use metastore_engine::Engine;
use metastore_mvcc::auth::Need;
use metastore_mvcc::{ApplyResponse, MAX_LEASE_TTL};
use metastore_proto::etcdserverpb::{
    lease_server::Lease, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use metastore_proto::internal::command::Op;
use metastore_raft::RaftStatus;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Lease settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LeaseConfig {
    /// How often the leader checkpoints remaining TTLs through Raft (etcd: 5 min).
    pub checkpoint_interval_ms: u64,
    /// Most leases revoked per second when many expire at once (etcd: 1000).
    pub revoke_rate: usize,
    /// Smallest TTL granted, seconds; 0 = 1.5 election timeouts rounded up, as etcd.
    pub min_ttl: i64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval_ms: 5_000,
            revoke_rate: 1_000,
            min_ttl: 0,
        }
    }
}

/// How often the clock looks for expired leases.
const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Clock {
    /// Term in which these deadlines were set; 0 = not leader.
    term: u64,
    deadlines: HashMap<i64, Instant>,
    /// Grants applied in a term this clock has not taken up yet, with that term: the first
    /// tick of the term keeps them as they are instead of extending them like older leases.
    early: HashMap<i64, (u64, Instant)>,
    revoking: HashSet<i64>,
    /// Checkpoints computed from the current deadlines are being replicated.
    checkpointing: bool,
}

/// The leader's deadlines.
#[derive(Default)]
pub struct LeaseClock {
    inner: Mutex<Clock>,
}

fn secs(n: i64) -> Duration {
    Duration::from_secs(n.max(0) as u64)
}

impl LeaseClock {
    /// Times a lease granted while raft says this member leads `term`; a follower keeps no
    /// clock (the lease is timed when it becomes leader, as every other lease).
    fn set(&self, id: i64, ttl: i64, status: &RaftStatus) {
        if !status.is_leader {
            return;
        }
        let (term, deadline) = (status.term, Instant::now() + secs(ttl));
        let mut c = self.inner.lock();
        if c.term == term {
            c.deadlines.insert(id, deadline);
        } else {
            c.early.insert(id, (term, deadline));
        }
    }

    fn forget(&self, id: i64) {
        let mut c = self.inner.lock();
        c.deadlines.remove(&id);
        c.revoking.remove(&id);
    }

    /// Remaining time of a lease the leader tracks.
    fn remaining(&self, id: i64) -> Option<Duration> {
        self.inner
            .lock()
            .deadlines
            .get(&id)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Runs the leader's lease clock until the server is dropped.
pub fn spawn_lease_clock<E: Engine>(server: Weak<EtcdServer<E>>, election_timeout: Duration) {
    // Deadlines come from the replicated lease state, which is only current once the log
    // present at start has been re-applied: a lease renewed just before a crash must not be
    // timed from an older checkpoint.
    crate::spawn_after_replay(server, move |server| async move {
        let mut ticker = tokio::time::interval(TICK);
        let mut next_checkpoint = Instant::now();
        loop {
            ticker.tick().await;
            let Some(server) = server.upgrade() else {
                return;
            };
            let status = server.raft.status();
            let leases = server.store.leases();
            let now = Instant::now();
            let interval = Duration::from_millis(server.lease_config.checkpoint_interval_ms);
            let (expired, checkpoints) = {
                let mut c = server.lease_clock.inner.lock();
                if !status.is_leader {
                    *c = Clock::default();
                    continue;
                }
                // As etcd's Promote: a new leader (or a restarted one) resumes every lease from
                // its last checkpointed remaining TTL plus one election timeout, so that clients
                // get the time to find it before anything expires.
                let extend = if c.term != status.term {
                    let early = std::mem::take(&mut c.early);
                    *c = Clock {
                        term: status.term,
                        ..Default::default()
                    };
                    c.deadlines.extend(
                        early
                            .into_iter()
                            .filter(|(_, (term, _))| *term == status.term)
                            .map(|(id, (_, deadline))| (id, deadline)),
                    );
                    next_checkpoint = now + interval;
                    election_timeout
                } else {
                    Duration::ZERO
                };
                let live: HashSet<i64> = leases.iter().map(|l| l.id).collect();
                c.deadlines.retain(|id, _| live.contains(id));
                c.revoking.retain(|id| live.contains(id));
                for l in &leases {
                    let left = if l.remaining_ttl > 0 {
                        l.remaining_ttl
                    } else {
                        l.ttl
                    };
                    c.deadlines.entry(l.id).or_insert(now + secs(left) + extend);
                }
                let budget = (server.lease_config.revoke_rate as u128 * TICK.as_millis() / 1000)
                    .max(1) as usize;
                let mut expired: Vec<i64> = c
                    .deadlines
                    .iter()
                    .filter(|(id, d)| **d <= now && !c.revoking.contains(id))
                    .map(|(id, _)| *id)
                    .collect();
                expired.sort_unstable();
                expired.truncate(budget);
                c.revoking.extend(expired.iter().copied());
                let mut checkpoints = Vec::new();
                if now >= next_checkpoint {
                    next_checkpoint = now + interval;
                    // etcd's rules: only leases longer than the interval, and only when some of
                    // the TTL is used up. Rounded up: a checkpoint never shortens a lease.
                    let ttl_of: HashMap<i64, i64> = leases.iter().map(|l| (l.id, l.ttl)).collect();
                    checkpoints = c
                        .deadlines
                        .iter()
                        .filter_map(|(id, d)| {
                            let ttl = *ttl_of.get(id)?;
                            let remaining =
                                d.saturating_duration_since(now).as_millis().div_ceil(1000) as i64;
                            (secs(ttl) > interval && remaining > 0 && remaining < ttl).then_some(
                                LeaseCheckpoint {
                                    id: *id,
                                    remaining_ttl: remaining,
                                },
                            )
                        })
                        .collect();
                    // A renewal from now on waits for these checkpoints, then clears them.
                    c.checkpointing = !checkpoints.is_empty();
                }
                (expired, checkpoints)
            };
            for id in expired {
                let server = server.clone();
                tokio::spawn(async move {
                    let result = server
                        .submit(Op::LeaseRevoke(LeaseRevokeRequest { id }))
                        .await;
                    if let Err(e) = &result {
                        if e.code() != tonic::Code::NotFound {
                            tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry");
                        }
                    }
                    server.lease_clock.inner.lock().revoking.remove(&id);
                });
            }
            for chunk in checkpoints.chunks(1000) {
                let cp = LeaseCheckpointRequest {
                    checkpoints: chunk.to_vec(),
                };
                if let Err(e) = server.submit(Op::LeaseCheckpoint(cp)).await {
                    tracing::warn!(error = %e, "lease checkpoint failed");
                }
            }
            server.lease_clock.inner.lock().checkpointing = false;
        }
    });
}

impl<E: Engine> EtcdServer<E> {
    fn min_lease_ttl(&self) -> i64 {
        self.lease_config.min_ttl.max(1)
    }

    /// Like etcd: a random positive 63-bit id not in use, chosen before proposing so that
    /// every member applies the same one.
    pub(crate) fn fresh_lease_id(&self) -> i64 {
        loop {
            let id = (rand::random::<u64>() >> 1) as i64;
            if id != 0 && self.store.lease(id, false).is_none() {
                return id;
            }
        }
    }

    /// Starts the leader's clock for a lease just granted.
    pub(crate) fn track_lease(&self, id: i64, ttl: i64) {
        self.lease_clock.set(id, ttl, &self.raft.status());
    }

    async fn renew(&self, id: i64, metadata: &tonic::metadata::MetadataMap) -> Result<i64, Status> {
        // etcd's checkLeaseRenew: write permission on every key attached.
        self.check_lease_keys(metadata, id, Need::Write)?;
        if !self.raft.status().is_leader {
            // Only the leader keeps lease time: a follower sends the renewal on.
            return self.renew_on_leader(id, metadata).await;
        }
        let Some(lease) = self.store.lease(id, false) else {
            // etcd answers a keep-alive for an unknown lease with TTL 0.
            return Ok(0);
        };
        let now = Instant::now();
        let checkpointing = {
            let mut c = self.lease_clock.inner.lock();
            let expired =
                c.revoking.contains(&id) || c.deadlines.get(&id).is_some_and(|d| *d <= now);
            if expired {
                // Its revoke is decided: renewing now would tell the client a lie (etcd
                // answers an expired lease as not found, TTL 0).
                return Ok(0);
            }
            c.deadlines.insert(id, now + secs(lease.ttl));
            c.checkpointing
        };
        if checkpointing {
            // A checkpoint computed before this renewal may still land after it: wait for it,
            // then clear it below.
            while self.lease_clock.inner.lock().checkpointing {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let remaining = self
            .store
            .lease(id, false)
            .map(|l| l.remaining_ttl)
            .unwrap_or(0);
        if remaining > 0 {
            // The last checkpoint is shorter than the renewed lease: clear it before saying
            // "renewed", or a restart now would expire the lease early (etcd does the same).
            self.submit(Op::LeaseCheckpoint(LeaseCheckpointRequest {
                checkpoints: vec![LeaseCheckpoint {
                    id,
                    remaining_ttl: 0,
                }],
            }))
            .await?;
        }
        Ok(lease.ttl)
    }
}

#[tonic::async_trait]
impl<E: Engine> Lease for Svc<E> {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        self.0.require_auth_info(request.metadata())?;
        let mut req = request.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        req.ttl = req.ttl.max(self.0.min_lease_ttl());
        if req.id == 0 {
            req.id = self.0.fresh_lease_id();
        }
        let (id, ttl) = (req.id, req.ttl);
        match self.0.submit(Op::LeaseGrant(req)).await? {
            ApplyResponse::LeaseGrant(mut resp) => {
                self.0.track_lease(id, ttl);
                self.0.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(crate::services::unexpected("lease grant")),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        self.0.require_auth_info(request.metadata())?;
        let req = request.into_inner();
        let id = req.id;
        let header = crate::EtcdServer::<E>::auth_header(who.as_ref());
        match self.0.submit_as(Op::LeaseRevoke(req), Some(header)).await? {
            ApplyResponse::LeaseRevoke(mut resp) => {
                self.0.lease_clock.forget(id);
                self.0.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(crate::services::unexpected("lease revoke")),
        }
    }

    type LeaseKeepAliveStream = BoxStream<'static, Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let server = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let reply = match server.renew(req.id, &metadata).await {
                    Ok(ttl) => Ok(LeaseKeepAliveResponse {
                        header: Some(server.header(server.store.current_revision())),
                        id: req.id,
                        ttl,
                    }),
                    Err(e) => Err(e),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        // etcd's checkLeaseTimeToLive: read permission on every key attached.
        self.0
            .check_lease_keys(request.metadata(), request.get_ref().id, Need::Read)?;
        let req = request.into_inner();
        let header = Some(self.0.header(self.0.store.current_revision()));
        let Some(lease) = self.0.store.lease(req.id, req.keys) else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        let remaining = match self.0.lease_clock.remaining(req.id) {
            Some(d) => d.as_secs() as i64,
            None if lease.remaining_ttl > 0 => lease.remaining_ttl,
            None => lease.ttl,
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl: remaining,
            granted_ttl: lease.ttl,
            keys: lease.keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let leases = self
            .0
            .store
            .leases()
            .into_iter()
            .map(|l| LeaseStatus { id: l.id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            leases,
        }))
    }
}
