//! The glue between the raft node and the state machine: committed entries are decoded,
//! applied to the store as one engine batch each, and their results delivered to the requests
//! waiting on this member.

use crate::CommandResult;
use futures::future::BoxFuture;
use metastore_batch::{Completer, ProposalRefused, ProposalSink};
use metastore_codec::decode_batch_shared;
use metastore_engine::Engine;
use metastore_mvcc::Store;
use metastore_raft::{CommittedEntry, RaftNode, StateMachine, StateMachineError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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
    /// Highest index held durably by the state machine (raised by the persist thread).
    durable: Arc<AtomicU64>,
    /// A snapshot or flush is running on the persist thread.
    persisting: Arc<AtomicBool>,
    /// No new snapshot or flush starts before this (see `PERSIST_DUTY_CYCLE`).
    next_persist_at: Arc<parking_lot::Mutex<Instant>>,
    /// Commands of an entry applied before their requests are answered.
    part_len: usize,
}

/// Most of the time the persist thread may be busy. A snapshot's cost grows with the whole
/// state (history included) while `snapshot-count` counts entries, so on a big store back-to-back
/// snapshots would take a core away from serving; after a persist that took `t`, the next one
/// waits `t * (1 / PERSIST_DUTY_CYCLE - 1)`. The WAL keeps everything meanwhile.
const PERSIST_DUTY_CYCLE: f64 = 0.25;

/// Share of one core a snapshot write may use while it runs (it sleeps in between).
const SNAPSHOT_CPU_SHARE: f64 = 0.25;

/// What the persist thread does.
enum PersistJob {
    Snapshot {
        capture: metastore_mvcc::snapshot::SnapshotCapture,
        dir: PathBuf,
        retention: usize,
    },
    Flush,
}

impl<E: Engine> ApplyDriver<E> {
    /// `durable` is the index already held durably at start (the loaded snapshot, or what the
    /// persistent engine recovered). `part_len` is the batch config's `apply_part_len`.
    pub fn new(
        store: Arc<Store<E>>,
        completer: CompleterSlot,
        durability: Durability,
        durable: u64,
        part_len: usize,
    ) -> Self {
        Self {
            store,
            completer,
            durability,
            durable: Arc::new(AtomicU64::new(durable)),
            persisting: Arc::default(),
            next_persist_at: Arc::new(parking_lot::Mutex::new(Instant::now())),
            part_len: part_len.max(1),
        }
    }

    /// Keeps the durable index in `cell` (the peer transport announces it to a witness).
    pub fn share_durable(mut self, cell: Arc<AtomicU64>) -> Self {
        cell.store(self.durable.load(Ordering::Acquire), Ordering::Release);
        self.durable = cell;
        self
    }

    /// Every `every` applied entries, makes the state machine durable on a separate thread,
    /// so applying (and every write waiting on it) never stops for a snapshot file or a
    /// RocksDB flush. Only the snapshot's capture (the small meta space) runs here, between
    /// entries.
    fn maybe_persist(&mut self) {
        let applied = self.store.applied_index();
        let every = match &self.durability {
            Durability::Snapshots { every, .. } | Durability::Flush { every } => (*every).max(1),
        };
        if applied < self.durable.load(Ordering::Acquire) + every
            || self.persisting.load(Ordering::Acquire)
            || Instant::now() < *self.next_persist_at.lock()
        {
            return;
        }
        let job = match &self.durability {
            Durability::Snapshots { dir, retention, .. } => match self.store.capture_snapshot() {
                Ok(capture) => PersistJob::Snapshot {
                    capture: capture.with_pace(SNAPSHOT_CPU_SHARE),
                    dir: dir.clone(),
                    retention: *retention,
                },
                Err(e) => {
                    tracing::warn!(index = applied, error = %e, "cannot capture a snapshot");
                    return;
                }
            },
            Durability::Flush { .. } => PersistJob::Flush,
        };
        self.persisting.store(true, Ordering::Release);
        let (store, durable, persisting, next_persist_at) = (
            self.store.clone(),
            self.durable.clone(),
            self.persisting.clone(),
            self.next_persist_at.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("persist".into())
            .spawn(move || {
                let started = Instant::now();
                let result = match job {
                    PersistJob::Snapshot {
                        capture,
                        dir,
                        retention,
                    } => capture
                        .write(store.engine().as_ref(), &dir, applied, 1, retention)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    // Everything applied up to `applied` was written before this flush
                    // starts, so the flush makes at least that much durable.
                    PersistJob::Flush => store.engine().persist().map_err(|e| e.to_string()),
                };
                match result {
                    Ok(()) => {
                        tracing::info!(
                            index = applied,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "state machine persisted"
                        );
                        durable.fetch_max(applied, Ordering::AcqRel);
                    }
                    // Nothing is lost: the WAL keeps everything until a later attempt succeeds.
                    Err(e) => {
                        tracing::warn!(index = applied, error = %e, "cannot persist the state machine")
                    }
                }
                let took = started.elapsed();
                *next_persist_at.lock() =
                    Instant::now() + took.mul_f64(1.0 / PERSIST_DUTY_CYCLE - 1.0);
                persisting.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the persist thread");
            self.persisting.store(false, Ordering::Release);
        }
    }
}

/// Why the state machine cannot go on: the member stops with it (`RaftError::StateMachine`).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("raft entry {index} cannot be decoded by this version ({source}); was it written by a newer MetaStore? Upgrade this member")]
    Undecodable {
        index: u64,
        #[source]
        source: metastore_codec::CodecError,
    },
    #[error("applying raft entry {index}: {source}")]
    Entry {
        index: u64,
        #[source]
        source: metastore_mvcc::MvccError,
    },
    #[error("conf change entry {index} has an undecodable context: {source}")]
    ConfChangeContext {
        index: u64,
        #[source]
        source: prost::DecodeError,
    },
    #[error("applying conf change entry {index}: {source}")]
    ConfChange {
        index: u64,
        #[source]
        source: metastore_mvcc::MvccError,
    },
    #[error("installing the snapshot at index {index}: {source}")]
    Install {
        index: u64,
        #[source]
        source: metastore_mvcc::MvccError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl<E: Engine> StateMachine for ApplyDriver<E> {
    fn apply(&mut self, entries: Vec<CommittedEntry>) -> Result<(), StateMachineError> {
        for entry in entries {
            // The WAL's CRC rules out damage, so an entry that does not decode was written by a
            // newer member (a frame layout the cluster version should have kept back) or by a
            // bug. Skipping it would let this member diverge from those that applied it: stop,
            // loudly, and let the operator upgrade this binary; the entry stays in the log.
            let index = entry.index;
            let batch = decode_batch_shared(entry.data)
                .map_err(|source| ApplyError::Undecodable { index, source })?;
            let completer = self.completer.0.get().filter(|c| c.is_waiting(batch.id));
            let total = batch.commands.len();
            let mut delivered = 0;
            let part_len = if completer.is_some() {
                self.part_len
            } else {
                usize::MAX
            };
            self.store
                .apply_in_parts(entry.index, &batch.commands, part_len, &mut |results| {
                    delivered += results.len();
                    if let Some(completer) = completer {
                        completer.complete_part(batch.id, results, delivered >= total);
                    }
                })
                .map_err(|source| ApplyError::Entry { index, source })?;
        }
        self.maybe_persist();
        Ok(())
    }

    fn durable_index(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        cc: &metastore_raft::eraftpb::ConfChange,
    ) -> Result<(), StateMachineError> {
        let change = member_change_of(cc)
            .map_err(|source| ApplyError::ConfChangeContext { index, source })?;
        self.store
            .apply_conf_change(index, change)
            .map_err(|source| ApplyError::ConfChange { index, source })?;
        self.maybe_persist();
        Ok(())
    }

    /// The same capture as the persist thread's: the file format is the memory engine's
    /// snapshot, whatever the engine, so a follower on either engine can install it (a RocksDB
    /// checkpoint would tie both ends to RocksDB's files). The write is paced like a persist.
    fn capture_snapshot(
        &mut self,
    ) -> Result<(u64, metastore_raft::SnapshotWriter), StateMachineError> {
        let index = self.store.applied_index();
        let capture = self.store.capture_snapshot()?.with_pace(SNAPSHOT_CPU_SHARE);
        let store = self.store.clone();
        Ok((
            index,
            Box::new(move |path: &std::path::Path| {
                Ok(capture.write_file(store.engine().as_ref(), path, 1)?)
            }),
        ))
    }

    fn install_snapshot(
        &mut self,
        path: &std::path::Path,
        index: u64,
    ) -> Result<(), StateMachineError> {
        // A persist running on the old state must not record its index as durable after the
        // new state is in: wait for it.
        while self.persisting.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Durability::Snapshots { dir, retention, .. } = &self.durability {
            // The memory engine's durable state is its newest snapshot file: this one, linked
            // into place before the engine changes, so a crash from here on restarts from it.
            let io = |path: &std::path::Path| {
                let path = path.to_path_buf();
                move |source| ApplyError::Io { path, source }
            };
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let target = metastore_mvcc::snapshot::snapshot_path(dir, index);
            let _ = std::fs::remove_file(&target);
            std::fs::hard_link(path, &target)
                .or_else(|_| std::fs::copy(path, &target).map(|_| ()))
                .map_err(io(&target))?;
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::File::open(dir))
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
            for (old_index, old) in metastore_mvcc::snapshot::list_snapshots(dir) {
                // Newer files than the leader's state belong to a history this member no
                // longer follows; older ones beyond the retention are not needed.
                if old_index > index {
                    let _ = std::fs::remove_file(&old);
                }
            }
            for (_, old) in metastore_mvcc::snapshot::list_snapshots(dir)
                .into_iter()
                .skip((*retention).max(1))
            {
                let _ = std::fs::remove_file(&old);
            }
        }
        self.store
            .install_snapshot(path, index)
            .map_err(|source| ApplyError::Install { index, source })?;
        // The persistent engine flushed the new state in the install.
        self.durable.store(index, Ordering::Release);
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        self.store.applied_index()
    }
}

/// The member table change a conf change entry carries: its context (a `MemberChange`), or,
/// for an entry without one, what its type and node id say.
fn member_change_of(
    cc: &metastore_raft::eraftpb::ConfChange,
) -> Result<metastore_proto::internal::MemberChange, prost::DecodeError> {
    use metastore_proto::internal::{member_change::Kind, MemberChange, MemberRecord};
    use metastore_raft::eraftpb::ConfChangeType;
    use prost::Message as _;
    let mut change = if cc.context.is_empty() {
        let kind = match cc.get_change_type() {
            ConfChangeType::AddNode => Kind::Add,
            ConfChangeType::AddLearnerNode => Kind::AddLearner,
            ConfChangeType::RemoveNode => Kind::Remove,
        };
        MemberChange {
            kind: kind as i32,
            member: Some(MemberRecord::default()),
        }
    } else {
        MemberChange::decode(&cc.context[..])?
    };
    // The raft change decides which member it is about.
    change.member.get_or_insert_with(Default::default).id = cc.node_id;
    Ok(change)
}

/// Proposes encoded batches to the raft node.
pub struct RaftSink(pub RaftNode);

impl ProposalSink for RaftSink {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        let node = self.0.clone();
        Box::pin(async move {
            node.propose(frame)
                .await
                .map_err(|e| Arc::new(e) as ProposalRefused)
        })
    }

    fn term(&self) -> u64 {
        self.0.term()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_codec::{encode_batch, Batch, CodecOptions, Command, Op};
    use metastore_memory::MemoryEngine;
    use metastore_proto::etcdserverpb::PutRequest;

    fn driver() -> (Arc<Store<MemoryEngine>>, ApplyDriver<MemoryEngine>) {
        let store = Arc::new(Store::open(Arc::new(MemoryEngine::new())).expect("open"));
        let driver = ApplyDriver::new(
            store.clone(),
            CompleterSlot::default(),
            Durability::Flush { every: u64::MAX },
            0,
            32,
        );
        (store, driver)
    }

    fn put_frame() -> bytes::Bytes {
        let batch = Batch {
            id: 1,
            commands: vec![Command {
                auth: None,
                op: Some(Op::Put(PutRequest {
                    key: "k".into(),
                    value: "v".into(),
                    ..Default::default()
                })),
            }],
        };
        encode_batch(&batch, &CodecOptions::default())
    }

    fn entry(index: u64, data: bytes::Bytes) -> CommittedEntry {
        CommittedEntry {
            index,
            term: 1,
            data,
        }
    }

    #[test]
    fn an_entry_from_a_newer_frame_layout_stops_the_member_instead_of_being_skipped() {
        let (store, mut driver) = driver();
        driver
            .apply(vec![entry(1, put_frame())])
            .expect("a frame of this version applies");
        let mut newer = put_frame().to_vec();
        newer[0] = (newer[0] & 0x0f) | (2 << 4);
        let err = driver
            .apply(vec![entry(2, newer.into()), entry(3, put_frame())])
            .expect_err("an undecodable entry must stop the member");
        assert!(
            matches!(
                err.downcast_ref::<ApplyError>(),
                Some(ApplyError::Undecodable { index: 2, .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("unsupported frame version 2"),
            "{err}"
        );
        assert_eq!(
            store.applied_index(),
            1,
            "nothing after it is applied either"
        );
    }
}
