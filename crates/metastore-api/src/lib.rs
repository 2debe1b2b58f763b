//! etcd v3 gRPC services over MetaStore's state machine and raft node.
//!
//! A write is validated, wrapped in a [`Command`], handed to the batch proposer, replicated,
//! applied by [`apply::ApplyDriver`] and answered with the result the state machine produced.
//! A read is served from the local store, after a ReadIndex barrier unless it is serializable.

pub mod apply;
pub mod errors;
mod services;
pub mod validate;

use metastore_batch::{BatchConfig, BatchProposer};
use metastore_engine::Engine;
use metastore_mvcc::{ApplyResponse, MvccError, Store};
use metastore_proto::etcdserverpb::ResponseHeader;
use metastore_raft::RaftNode;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use services::{routes, UNIMPLEMENTED_SERVICES};

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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
        }
    }
}

/// One member as `Cluster.MemberList` shows it.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ClusterInfo {
    pub cluster_id: u64,
    pub member_id: u64,
    pub members: Vec<MemberInfo>,
}

/// Everything the services share.
pub struct EtcdServer<E: Engine> {
    pub store: Arc<Store<E>>,
    pub raft: RaftNode,
    pub proposer: BatchProposer<CommandResult>,
    pub limits: Limits,
    pub cluster: ClusterInfo,
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
    ) -> Arc<Self> {
        let proposer = BatchProposer::start(batch, Arc::new(apply::RaftSink(raft.clone())));
        completer_slot.set(proposer.completer());
        Arc::new(Self {
            store,
            raft,
            proposer,
            limits,
            cluster,
        })
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
