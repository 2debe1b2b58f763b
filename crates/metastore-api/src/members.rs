//! Each member publishes its name and client URLs through raft once it serves (etcd's
//! `publishV3`), so that every member's MemberList names every member's client URLs.

use crate::EtcdServer;
use metastore_engine::Engine;
use metastore_proto::internal::{command::Op, MemberAttrSet};
use std::sync::Weak;
use std::time::Duration;

/// How soon a publication that failed (no leader yet) is tried again.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

impl<E: Engine> EtcdServer<E> {
    fn own_attrs(&self) -> Option<MemberAttrSet> {
        Some(MemberAttrSet {
            member_id: self.cluster.member_id,
            name: self.cluster.name.clone(),
            client_urls: self.cluster.client_urls.clone(),
            is_witness: false,
        })
    }

    /// Publishes this member's attributes unless the replicated ones are already the same.
    /// True once they are.
    pub async fn publish_attrs(&self) -> bool {
        let Some(own) = self.own_attrs() else {
            return true;
        };
        if self.store.member_attrs().get(&own.member_id) == Some(&own) {
            return true;
        }
        match self.submit(Op::MemberAttrSet(own)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot publish this member's attributes yet");
                false
            }
        }
    }

    /// The client URLs `member` published; this member's own before it has.
    pub fn client_urls_of(&self, member: u64) -> Vec<String> {
        match self.store.member_attrs().get(&member) {
            Some(published) => published.client_urls.clone(),
            None if member == self.cluster.member_id => self.cluster.client_urls.clone(),
            None => Vec::new(),
        }
    }
}

pub fn spawn_attr_publisher<E: Engine>(server: Weak<EtcdServer<E>>) {
    crate::spawn_after_replay(server, |server| async move {
        loop {
            let Some(server) = server.upgrade() else {
                return;
            };
            if server.raft.is_stopped() || server.publish_attrs().await {
                return;
            }
            drop(server);
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    });
}
