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
use std::path::PathBuf;
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

/// How the state machine makes its state durable on its own, so the WAL below can go.
#[derive(Clone, Debug)]
pub enum Durability {
    /// A memory engine: write a snapshot file every `every` applied entries, keep `retention`.
    Snapshots {
        dir: PathBuf,
        every: u64,
        retention: usize,
    },
    /// A persistent engine: flush it every `every` applied entries.
    Flush { every: u64 },
}

pub struct ApplyDriver<E: Engine> {
    store: Arc<Store<E>>,
    completer: CompleterSlot,
    durability: Durability,
    durable: u64,
}

impl<E: Engine> ApplyDriver<E> {
    /// `durable` is the index already held durably at start (the loaded snapshot, or what the
    /// persistent engine recovered).
    pub fn new(
        store: Arc<Store<E>>,
        completer: CompleterSlot,
        durability: Durability,
        durable: u64,
    ) -> Self {
        Self {
            store,
            completer,
            durability,
            durable,
        }
    }

    fn maybe_persist(&mut self) {
        let applied = self.store.applied_index();
        let every = match &self.durability {
            Durability::Snapshots { every, .. } | Durability::Flush { every } => (*every).max(1),
        };
        if applied < self.durable + every {
            return;
        }
        let started = std::time::Instant::now();
        let result = match &self.durability {
            Durability::Snapshots { dir, retention, .. } => {
                // The apply loop is the only writer, so the engine does not change meanwhile.
                metastore_mvcc::snapshot::write_snapshot(
                    self.store.engine().as_ref(),
                    dir,
                    applied,
                    1,
                    *retention,
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
            Durability::Flush { .. } => self.store.engine().persist().map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    index = applied,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "state machine persisted"
                );
                self.durable = applied;
            }
            // Nothing is lost: the WAL keeps everything until a later attempt succeeds.
            Err(e) => {
                tracing::warn!(index = applied, error = %e, "cannot persist the state machine")
            }
        }
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
        self.maybe_persist();
        Ok(())
    }

    fn durable_index(&self) -> u64 {
        self.durable
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
