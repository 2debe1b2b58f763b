//! The glue between the raft node and the state machine: committed entries are decoded,
//! applied to the store as one engine batch each, and their results delivered to the requests
//! waiting on this member.

use crate::CommandResult;
use futures::future::BoxFuture;
use metastore_batch::{Completer, ProposalSink};
use metastore_codec::decode_batch;
use metastore_engine::Engine;
use metastore_mvcc::Store;
use metastore_raft::{CommittedEntry, RaftNode, StateMachine};
use std::sync::{Arc, OnceLock};

/// The completer arrives after the raft node starts (the proposer needs the node); entries
/// replayed before that have nobody waiting for them.
#[derive(Clone, Default)]
pub struct CompleterSlot(Arc<OnceLock<Completer<CommandResult>>>);

impl CompleterSlot {
    pub fn set(&self, completer: Completer<CommandResult>) {
        let _ = self.0.set(completer);
    }
}

pub struct ApplyDriver<E: Engine> {
    store: Arc<Store<E>>,
    completer: CompleterSlot,
}

impl<E: Engine> ApplyDriver<E> {
    pub fn new(store: Arc<Store<E>>, completer: CompleterSlot) -> Self {
        Self { store, completer }
    }
}

impl<E: Engine> StateMachine for ApplyDriver<E> {
    fn apply(&mut self, entries: Vec<CommittedEntry>) -> Result<(), String> {
        for entry in entries {
            // The WAL's CRC rules out damage, so an entry that does not decode does so on every
            // member alike: skipping it keeps members identical, while stopping would brick
            // them all, again at every replay.
            let batch = match decode_batch(&entry.data) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(index = entry.index, error = %e, "skipping an undecodable raft entry");
                    continue;
                }
            };
            let results = self
                .store
                .apply(entry.index, &batch.commands)
                .map_err(|e| format!("applying raft entry {}: {e}", entry.index))?;
            if let (Some(results), Some(completer)) = (results, self.completer.0.get()) {
                completer.complete(batch.id, results);
            }
        }
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        self.store.applied_index()
    }
}

/// Proposes encoded batches to the raft node.
pub struct RaftSink(pub RaftNode);

impl ProposalSink for RaftSink {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
        let node = self.0.clone();
        Box::pin(async move { node.propose(frame).await.map_err(|e| e.to_string()) })
    }
}
