//! The leader's half of the version gate (etcd's `monitorClusterVersions`): it sets the
//! replicated cluster version to the lowest version among the members, so that nothing newer
//! than every member can read is ever proposed.
//!
//! Peers announce their version on every batch of raft messages (`metastore-transport`); a
//! member not heard from yet leaves the version undecided, as in etcd.

use crate::EtcdServer;
use metastore_engine::Engine;
use metastore_mvcc::ClusterVersion;
use metastore_proto::internal::{command::Op, ClusterVersionSet};
use std::sync::Weak;
use std::time::Duration;

/// How often the leader checks (etcd: every 4 s).
const CHECK_INTERVAL: Duration = Duration::from_secs(4);
/// How soon it tries again while the version is below what the members allow.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

impl<E: Engine> EtcdServer<E> {
    /// The versions the members run, as far as this member knows them: None for a member
    /// that has not announced a readable one.
    pub fn member_versions(&self) -> Vec<Option<ClusterVersion>> {
        let members = self.store.members();
        if members.is_empty() {
            // The member table is not known yet (a member joining a cluster): undecided.
            return vec![None];
        }
        members
            .keys()
            .map(|&id| {
                if id == self.cluster.member_id {
                    Some(ClusterVersion::this_build())
                } else {
                    (self.peer_versions.0)(id).and_then(|v| ClusterVersion::parse(&v))
                }
            })
            .collect()
    }

    /// The cluster version the members allow: the lowest of theirs, once every member's is
    /// known.
    fn target_cluster_version(&self) -> Option<ClusterVersion> {
        let known: Option<Vec<ClusterVersion>> = self.member_versions().into_iter().collect();
        ClusterVersion::decide(&known?)
    }

    /// Proposes the cluster version the members allow, if it is above the current one.
    /// Returns what was proposed.
    pub async fn update_cluster_version(&self) -> Option<ClusterVersion> {
        let target = self.target_cluster_version()?;
        if self.store.cluster_version().is_some_and(|c| c >= target) {
            return None;
        }
        let op = Op::ClusterVersionSet(ClusterVersionSet {
            version: target.to_string(),
        });
        match self.submit(op).await {
            Ok(_) => Some(target),
            Err(e) => {
                tracing::debug!(error = %e, %target, "cannot set the cluster version yet");
                None
            }
        }
    }
}

pub fn spawn_cluster_version_monitor<E: Engine>(server: Weak<EtcdServer<E>>) {
    crate::spawn_after_replay(server, |server| async move {
        let mut wait = Duration::ZERO;
        loop {
            tokio::time::sleep(wait).await;
            let Some(server) = server.upgrade() else {
                return;
            };
            if server.raft.is_stopped() {
                return;
            }
            if server.raft.status().is_leader {
                server.update_cluster_version().await;
            }
            let target = server.target_cluster_version();
            // Until the version is set (a new cluster, a new leader), check often.
            wait = if server.store.cluster_version() >= target {
                CHECK_INTERVAL
            } else {
                RETRY_INTERVAL
            };
        }
    });
}
