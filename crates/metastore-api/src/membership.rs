//! Membership changes as etcd makes them: the Cluster service (add, add as learner, promote,
//! remove, update, list), `MoveLeader`, the hand-off of leadership before a leader stops, and
//! what a learner may serve.
//!
//! Changes are decided on the leader, one at a time, after a ReadIndex barrier, with etcd's
//! rules and error texts; a follower forwards them to the leader's client port. Add, promote
//! and remove are raft conf changes (the member record in their context), so raft and the
//! member table change at the same log index on every member; update (peer URLs, which raft
//! does not know) is an ordinary command.

use crate::{errors, EtcdServer};
use metastore_engine::Engine;
use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::Member;
use metastore_proto::internal::{command::Op, member_change::Kind, MemberChange, MemberRecord};
use metastore_raft::eraftpb::{ConfChange, ConfChangeType};
use metastore_raft::RaftError;
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Status;

/// A peer counts as healthy for a reconfiguration only once connected this long (etcd's
/// `HealthInterval`).
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A learner may be promoted once its log matches this share of the leader's.
const LEARNER_READY_SHARE: f64 = 0.9;
/// How long a membership change may take, forwarding and applying included.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A change of the member table, as the Cluster service asks for it.
#[derive(Clone, Debug)]
pub(crate) enum Change {
    Add {
        peer_urls: Vec<String>,
        learner: bool,
    },
    Promote(u64),
    Remove(u64),
    Update {
        id: u64,
        peer_urls: Vec<String>,
    },
}

/// Keeps `EtcdServer::is_learner` in step with the member table.
pub(crate) fn spawn_learner_flag<E: Engine>(server: &Arc<EtcdServer<E>>) {
    // Weak: the store (and a RocksDB engine under it) must close when the server goes, not
    // when the runtime drops this task at exit.
    let store = Arc::downgrade(&server.store);
    let flag = server.is_learner.clone();
    let id = server.cluster.member_id;
    let mut changes = server.store.membership_changes();
    tokio::spawn(async move {
        loop {
            let Some(s) = store.upgrade() else {
                return;
            };
            let learner = s.members().get(&id).is_some_and(|m| m.is_learner);
            drop(s);
            flag.store(learner, Ordering::Release);
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
}

/// etcd accepts `http` and `https` URLs with a host and a port, and nothing after them.
pub(crate) fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(errors::member_bad_urls());
    }
    for url in urls {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(errors::member_bad_urls)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(errors::member_bad_urls)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(errors::member_bad_urls());
        }
    }
    Ok(())
}

impl<E: Engine> EtcdServer<E> {
    pub fn is_learner(&self) -> bool {
        self.is_learner.load(Ordering::Acquire)
    }

    /// Waits until the member table names this member, and what it is then: a member that
    /// joined a running cluster learns that from the leader's log or snapshot, and serves
    /// nothing before it knows whether it is a learner (and has the data it was added at).
    pub async fn wait_for_own_membership(&self) {
        let mut changes = self.store.membership_changes();
        let me = self.cluster.member_id;
        loop {
            if let Some(m) = self.store.members().get(&me) {
                self.is_learner.store(m.is_learner, Ordering::Release);
                return;
            }
            if self.raft.is_stopped() || self.raft.is_removed() {
                return;
            }
            // Woken by a change, or now and then to notice a member that stopped.
            let _ = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
        }
    }

    /// MemberList's view of the member table, by id.
    pub fn member_list(&self) -> Vec<Member> {
        let attrs = self.store.member_attrs();
        self.store
            .members()
            .into_values()
            .map(|m| {
                let published = attrs.get(&m.id);
                // etcd: the bootstrap name until the member publishes its own; empty for a
                // member added at runtime that has not started.
                let mut name = published
                    .map(|a| a.name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or(m.name);
                if self.is_witness(m.id) {
                    name.push_str(" (witness)");
                }
                Member {
                    id: m.id,
                    name,
                    peer_ur_ls: m.peer_urls,
                    client_ur_ls: self.client_urls_of(m.id),
                    is_learner: m.is_learner,
                }
            })
            .collect()
    }

    /// A client of the leader's Cluster service, or None when this member leads. Waits for
    /// a leader while there is none.
    async fn leader_cluster_client(&self) -> Result<Option<ClusterClient<Channel>>, Status> {
        let mut leadership = self.raft.leadership();
        let leader = match tokio::time::timeout(
            CHANGE_TIMEOUT,
            leadership.wait_for(|(_, leader)| *leader != 0),
        )
        .await
        {
            Ok(Ok(state)) => state.1,
            _ => return Err(errors::no_leader()),
        };
        if leader == self.cluster.member_id {
            return Ok(None);
        }
        let channel = self
            .dialer
            .0
            .dial(self.leader_endpoint(leader)?.timeout(CHANGE_TIMEOUT));
        Ok(Some(ClusterClient::new(channel)))
    }

    /// Runs `change` on the leader: here if this member leads, else forwarded with `forward`.
    /// Returns the member added (for an add) and the member list after the change.
    pub(crate) async fn change_membership<F, Fut>(
        &self,
        change: Change,
        forward: F,
    ) -> Result<(Option<Member>, Vec<Member>), Status>
    where
        F: FnOnce(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(Option<Member>, Vec<Member>), Status>>,
    {
        if let Change::Remove(id) = &change {
            if *id == self.cluster.member_id && self.raft.status().is_leader {
                // raft-rs would leave a removed leader leading: hand leadership over first,
                // then let the new leader remove this member.
                self.hand_off_leadership().await;
            }
        }
        match self.leader_cluster_client().await? {
            Some(client) => forward(client).await,
            None => self.change_as_leader(change).await,
        }
    }

    async fn change_as_leader(
        &self,
        change: Change,
    ) -> Result<(Option<Member>, Vec<Member>), Status> {
        let _one_at_a_time = self.membership_lock.lock().await;
        // Decide on the latest member table: everything committed before is applied here.
        match tokio::time::timeout(CHANGE_TIMEOUT, self.raft.linearizable_barrier()).await {
            Ok(r) => r.map_err(errors::from_raft)?,
            Err(_) => return Err(errors::timeout()),
        }
        let members = self.store.members();
        let (kind, record) = self.validate(&change, &members).await?;
        let id = record.id;
        let member_change = MemberChange {
            kind: kind as i32,
            member: Some(record.clone()),
        };
        if kind == Kind::Update {
            self.submit(Op::MemberChange(member_change)).await?;
            return Ok((None, self.member_list()));
        }
        let change_type = match kind {
            Kind::AddLearner => ConfChangeType::AddLearnerNode,
            Kind::Remove => ConfChangeType::RemoveNode,
            _ => ConfChangeType::AddNode,
        };
        let cc = ConfChange {
            change_type,
            node_id: id,
            context: member_change.encode_to_vec().into(),
            ..Default::default()
        };
        tracing::info!(?kind, member = format_args!("{id:x}"), peer_urls = ?record.peer_urls, "proposing a membership change");
        self.propose_conf_change_and_wait(cc).await?;
        let after = self.store.members();
        let done = match kind {
            Kind::Add | Kind::AddLearner => after.contains_key(&id),
            Kind::Promote => after.get(&id).is_some_and(|m| !m.is_learner),
            Kind::Remove => !after.contains_key(&id),
            Kind::Update => true,
        };
        if !done {
            // The entry was replaced under a new leader: the change never happened.
            return Err(errors::leader_changed());
        }
        let added = matches!(kind, Kind::Add | Kind::AddLearner).then(|| Member {
            id,
            name: String::new(),
            peer_ur_ls: record.peer_urls.clone(),
            client_ur_ls: Vec::new(),
            is_learner: kind == Kind::AddLearner,
        });
        Ok((added, self.member_list()))
    }

    async fn propose_conf_change_and_wait(&self, cc: ConfChange) -> Result<(), Status> {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let index = loop {
            match self.raft.propose_conf_change(cc.clone()).await {
                Ok(index) => break index,
                // A change of the previous leader is not committed yet.
                Err(RaftError::ConfChangePending) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(RaftError::ConfChangePending) => return Err(errors::timeout()),
                Err(RaftError::NotLeader) => return Err(errors::leader_changed()),
                Err(e) => return Err(errors::from_raft(e)),
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.raft.wait_applied(index)).await {
            Ok(r) => r.map_err(errors::from_raft),
            Err(_) => Err(errors::timeout()),
        }
    }

    /// etcd's checks for a change (`ValidateConfigurationChange` and, with strict
    /// reconfiguration checks, `mayAddMember` / `mayRemoveMember` / `mayPromoteMember`).
    async fn validate(
        &self,
        change: &Change,
        members: &BTreeMap<u64, MemberRecord>,
    ) -> Result<(Kind, MemberRecord), Status> {
        let strict = self.membership_config.strict_reconfig_check;
        match change {
            Change::Add { peer_urls, learner } => {
                check_peer_urls(peer_urls)?;
                let id = (self.membership_config.new_member_id.0)(peer_urls);
                check_new_member(members, id, peer_urls)?;
                if *learner {
                    let learners = members.values().filter(|m| m.is_learner).count();
                    if learners + 1 > self.membership_config.max_learners {
                        return Err(errors::too_many_learners());
                    }
                }
                if strict && !learner {
                    let voters = voters(members);
                    if !self.ready_to_add_voter(&voters) {
                        return Err(errors::member_not_enough_started());
                    }
                    // The new member counts as down until it has started.
                    if voters.len() > 1 && self.connected_now(&voters) < quorum(voters.len() + 1) {
                        return Err(errors::unhealthy());
                    }
                }
                let kind = if *learner {
                    Kind::AddLearner
                } else {
                    Kind::Add
                };
                let record = MemberRecord {
                    id,
                    name: String::new(),
                    peer_urls: peer_urls.clone(),
                    is_learner: *learner,
                };
                Ok((kind, record))
            }
            Change::Promote(id) => {
                let member = members.get(id).ok_or_else(errors::member_not_found)?;
                if !member.is_learner {
                    return Err(errors::member_not_learner());
                }
                self.check_learner_ready(*id).await?;
                if strict {
                    // The learner counts as started, and as one more voter.
                    let voters = voters(members);
                    let started = 1 + voters.iter().filter(|v| self.is_started(**v)).count();
                    if started < quorum(voters.len() + 1) {
                        return Err(errors::member_not_enough_started());
                    }
                }
                Ok((Kind::Promote, member.clone()))
            }
            Change::Remove(id) => {
                let member = members.get(id).ok_or_else(errors::member_not_found)?;
                if strict && !member.is_learner {
                    let voters = voters(members);
                    let remaining: Vec<u64> = voters.iter().copied().filter(|v| v != id).collect();
                    let started = remaining.iter().filter(|v| self.is_started(**v)).count();
                    if started < quorum(remaining.len()) {
                        return Err(errors::member_not_enough_started());
                    }
                    // A member that is down is safe to remove: it is not part of the quorum
                    // that keeps the cluster going.
                    let down = *id != self.cluster.member_id && (self.peer_health())(*id).is_none();
                    if !down
                        && self.connected_now(&voters).saturating_sub(1)
                            < 1 + (voters.len() - 1) / 2
                    {
                        return Err(errors::unhealthy());
                    }
                }
                Ok((Kind::Remove, member.clone()))
            }
            Change::Update { id, peer_urls } => {
                check_peer_urls(peer_urls)?;
                let member = members.get(id).ok_or_else(errors::member_not_found)?;
                if members
                    .values()
                    .filter(|m| m.id != *id)
                    .any(|m| m.peer_urls.iter().any(|u| peer_urls.contains(u)))
                {
                    return Err(errors::peer_url_exist());
                }
                Ok((
                    Kind::Update,
                    MemberRecord {
                        peer_urls: peer_urls.clone(),
                        ..member.clone()
                    },
                ))
            }
        }
    }

    /// A member that said it is a witness: in its published attributes, or on its raft
    /// stream to this member.
    fn is_witness(&self, id: u64) -> bool {
        self.store
            .member_attrs()
            .get(&id)
            .is_some_and(|a| a.is_witness)
            || (self.membership_config.witnesses.0)(id)
    }

    fn peer_health(&self) -> &(dyn Fn(u64) -> Option<Instant> + Send + Sync) {
        self.membership_config.peer_health.0.as_ref()
    }

    /// etcd's `IsStarted`: the member has a name (its bootstrap name, or the one it
    /// published once it served).
    fn is_started(&self, id: u64) -> bool {
        let published = self
            .store
            .member_attrs()
            .get(&id)
            .is_some_and(|a| !a.name.is_empty());
        published
            || self
                .store
                .members()
                .get(&id)
                .is_some_and(|m| !m.name.is_empty())
    }

    /// etcd's `IsReadyToAddVotingMember`.
    fn ready_to_add_voter(&self, voters: &[u64]) -> bool {
        let members = voters.len() + 1;
        let started = voters.iter().filter(|v| self.is_started(**v)).count();
        // Growing a one-member cluster (restoring from a backup) is always allowed.
        (started == 1 && members == 2) || started >= quorum(members)
    }

    /// Voters this member has been connected to for `HEALTH_INTERVAL`, itself included.
    fn connected_now(&self, voters: &[u64]) -> usize {
        let Some(since) = Instant::now().checked_sub(HEALTH_INTERVAL) else {
            return 1;
        };
        voters
            .iter()
            .filter(|&&v| {
                v == self.cluster.member_id || (self.peer_health())(v).is_some_and(|t| t <= since)
            })
            .count()
    }

    /// etcd's `isLearnerReady`: the learner's log matches at least 90 % of the leader's.
    async fn check_learner_ready(&self, id: u64) -> Result<(), Status> {
        let progress = self
            .raft
            .progress()
            .await
            .map_err(errors::from_raft)?
            .ok_or_else(errors::not_leader)?;
        let learner = *progress.get(&id).ok_or_else(errors::member_not_found)?;
        let leader = progress
            .get(&self.cluster.member_id)
            .copied()
            .unwrap_or_default()
            .max(1);
        if (learner as f64) / (leader as f64) < LEARNER_READY_SHARE {
            return Err(errors::learner_not_ready());
        }
        Ok(())
    }

    /// `Maintenance.MoveLeader`: on the leader only; returns once `target` leads.
    pub(crate) async fn move_leader(&self, target: u64) -> Result<(), Status> {
        if !self.raft.status().is_leader {
            return Err(errors::not_leader());
        }
        let members = self.store.members();
        if members.get(&target).is_none_or(|m| m.is_learner) || self.is_witness(target) {
            return Err(errors::bad_leader_transferee());
        }
        if target == self.cluster.member_id {
            return Ok(());
        }
        let mut leadership = self.raft.leadership();
        self.raft
            .transfer_leader(target)
            .map_err(errors::from_raft)?;
        let wait = async {
            leadership
                .wait_for(|(_, leader)| *leader == target)
                .await
                .map(|state| *state)
        };
        match tokio::time::timeout(self.transfer_timeout(), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(errors::leader_transfer_timeout()),
        }
    }

    /// etcd's request timeout for a leader transfer: 5 s and two election timeouts.
    fn transfer_timeout(&self) -> Duration {
        Duration::from_secs(5) + self.election_timeout * 2
    }

    /// Hands leadership to the voter connected the longest, and waits until another member
    /// leads (or the transfer timeout passes): done before a leader stops or removes itself,
    /// so that the cluster does not wait an election timeout for a new leader.
    pub async fn hand_off_leadership(&self) {
        if !self.raft.status().is_leader {
            return;
        }
        let me = self.cluster.member_id;
        let voters = self.raft.membership().borrow().voters.clone();
        let target = voters
            .iter()
            .filter(|&&v| v != me && !self.is_witness(v))
            .filter_map(|&v| (self.peer_health())(v).map(|since| (since, v)))
            .min()
            .map(|(_, v)| v);
        let Some(target) = target else {
            return;
        };
        let started = Instant::now();
        let mut leadership = self.raft.leadership();
        if self.raft.transfer_leader(target).is_err() {
            return;
        }
        let moved = async {
            leadership
                .wait_for(|(_, leader)| *leader != 0 && *leader != me)
                .await
                .map(|state| *state)
        };
        match tokio::time::timeout(self.transfer_timeout(), moved).await {
            Ok(Ok(state)) => tracing::info!(
                to = format_args!("{:x}", state.1),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "leadership handed over"
            ),
            _ => tracing::warn!(
                to = format_args!("{target:x}"),
                "leadership was not handed over in time"
            ),
        }
    }
}

/// etcd's order of checks for a new member: its id, then its peer URLs.
fn check_new_member(
    members: &BTreeMap<u64, MemberRecord>,
    id: u64,
    peer_urls: &[String],
) -> Result<(), Status> {
    if members.contains_key(&id) {
        return Err(errors::member_exist());
    }
    if members
        .values()
        .any(|m| m.peer_urls.iter().any(|u| peer_urls.contains(u)))
    {
        return Err(errors::peer_url_exist());
    }
    Ok(())
}

fn voters(members: &BTreeMap<u64, MemberRecord>) -> Vec<u64> {
    members
        .values()
        .filter(|m| !m.is_learner)
        .map(|m| m.id)
        .collect()
}

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_checked_as_etcd_does() {
        let ok = |u: &str| check_peer_urls(&[u.to_string()]).is_ok();
        assert!(ok("http://127.0.0.1:2380"));
        assert!(ok("https://node-1.example:12380"));
        assert!(!ok("127.0.0.1:2380"));
        assert!(!ok("http://127.0.0.1"));
        assert!(!ok("http://:2380"));
        assert!(!ok("ftp://a:1"));
        assert!(check_peer_urls(&[]).is_err());
        let err = check_peer_urls(&["x".into()]).expect_err("bad");
        assert_eq!(err.message(), "etcdserver: given member URLs are invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    /// Two adds of the same peer URLs in the same second get the same id (etcd mixes the
    /// time in seconds into it): the id is checked first, as etcd does.
    #[test]
    fn a_new_member_is_checked_by_id_then_by_peer_urls() {
        let url = "http://127.0.0.1:2380".to_string();
        let members: BTreeMap<u64, MemberRecord> = [(
            7,
            MemberRecord {
                id: 7,
                name: "m1".into(),
                peer_urls: vec![url.clone()],
                is_learner: false,
            },
        )]
        .into();
        let err = check_new_member(&members, 7, std::slice::from_ref(&url)).expect_err("same id");
        assert_eq!(err.message(), "etcdserver: member ID already exist");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = check_new_member(&members, 8, &[url]).expect_err("same URL");
        assert_eq!(err.message(), "etcdserver: Peer URLs already exists");
        assert!(check_new_member(&members, 8, &["http://127.0.0.1:2381".into()]).is_ok());
    }

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
    }
}
