//! The apply thread: committed entries to the state machine, durability back to the raft
//! thread; and the guard that marks the member stopped when either thread ends.

use crate::{
    CommittedEntry, Input, RaftError, Shared, StateMachine, StateMachineError, WalStorage,
};
use flume::{Receiver, Sender};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, EntryType, Snapshot};
use raft::prelude::Entry;
use raft::Storage;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the raft thread hands the apply thread, in log order.
pub(crate) enum ApplyInput {
    Entries(Vec<Entry>),
    /// A follower needs a snapshot: capture the state now, write it on another thread.
    BuildSnapshot,
    /// Replace the state with the leader's snapshot in `path`; answer on `reply` once it is
    /// durable.
    Install {
        path: PathBuf,
        index: u64,
        term: u64,
        reply: Sender<Result<(), RaftError>>,
    },
}

/// Marks the member stopped when the raft or the apply thread ends for any reason, a panic
/// included: a member whose loops are gone can acknowledge nothing and must not look alive
/// (the server exits on `is_stopped`, so that its supervisor restarts it).
pub(crate) struct StopOnExit {
    pub(crate) shared: Arc<Shared>,
    pub(crate) thread: &'static str,
}

impl Drop for StopOnExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                thread = self.thread,
                "thread panicked; stopping this member"
            );
            let mut failure = self.shared.failure.lock();
            if failure.is_none() {
                *failure = Some(RaftError::ThreadPanicked(self.thread));
            }
        }
        self.shared.stopped.store(true, Ordering::Release);
        // Wake every reader waiting on the applied index and every proposal or ReadIndex
        // waiting for an answer: they fail now.
        self.shared.applied.send_modify(|_| {});
        self.shared.stop_notify.notify_waiters();
    }
}

/// What a batch of committed entries counts for in the apply backlog: its payloads and a
/// little for each entry, so that empty entries count too.
pub(crate) fn backlog_bytes(entries: &[Entry]) -> u64 {
    const PER_ENTRY: u64 = 64;
    entries
        .iter()
        .map(|e| e.data.len() as u64 + PER_ENTRY)
        .sum()
}

/// The apply thread stops merging queued batches into one state machine call past this many
/// bytes: the call's engine batch stays bounded, and the applied index (and the backlog the
/// raft thread waits on) moves in steps.
const MAX_COALESCED_BYTES: u64 = 16 * 1024 * 1024;

pub(crate) fn apply_loop(
    shared: Arc<Shared>,
    mut sm: Box<dyn StateMachine>,
    rx: Receiver<ApplyInput>,
    raft_tx: Sender<Input>,
    storage: WalStorage,
) {
    let mut durable = sm.durable_index();
    let mut terms = TermStarts::default();
    let mut next: Option<ApplyInput> = None;
    loop {
        let input = match next.take() {
            Some(input) => input,
            None => match rx.recv() {
                Ok(input) => input,
                Err(_) => return,
            },
        };
        let mut entries = match input {
            ApplyInput::Entries(entries) => entries,
            ApplyInput::BuildSnapshot => {
                build_snapshot(sm.as_mut(), &storage, &terms);
                continue;
            }
            ApplyInput::Install {
                path,
                index,
                term,
                reply,
            } => {
                if let Err(e) = sm.install_snapshot(&path, index) {
                    tracing::error!(index, error = %e, "cannot install the leader's snapshot; stopping this member");
                    let e = RaftError::from(e);
                    stop_member(&shared, e.clone());
                    let _ = reply.send(Err(e));
                    return;
                }
                terms = TermStarts::default();
                terms.record(index, term);
                shared.applied.send_replace(index);
                durable = durable.max(sm.durable_index());
                let _ = reply.send(Ok(()));
                continue;
            }
        };
        // Coalesce the entries queued behind into one call: fewer engine batches under load.
        let mut bytes = backlog_bytes(&entries);
        while bytes < MAX_COALESCED_BYTES {
            match rx.try_recv() {
                Ok(ApplyInput::Entries(more)) => {
                    bytes += backlog_bytes(&more);
                    entries.extend(more);
                }
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let Some(last) = entries.last().map(|e| e.index) else {
            continue;
        };
        for e in &entries {
            terms.record(e.index, e.term);
        }
        if let Err(e) = apply_in_order(sm.as_mut(), entries) {
            tracing::error!(error = %e, "state machine failed; stopping this member");
            stop_member(&shared, RaftError::from(e));
            return;
        }
        shared.applied.send_replace(last);
        shared
            .apply_backlog_bytes
            .fetch_sub(bytes, Ordering::SeqCst);
        if shared.apply_held.load(Ordering::SeqCst) {
            let _ = raft_tx.send(Input::Applied);
        }
        let now_durable = sm.durable_index();
        if now_durable > durable {
            durable = now_durable;
            let _ = raft_tx.send(Input::Compact {
                index: durable,
                term: terms.term_at(durable),
            });
            terms.forget_below(durable);
        }
    }
}

/// Hands entries to the state machine in log order: runs of normal entries as one call,
/// membership changes one by one between them.
fn apply_in_order(sm: &mut dyn StateMachine, entries: Vec<Entry>) -> Result<(), StateMachineError> {
    let mut normal: Vec<CommittedEntry> = Vec::new();
    for e in entries {
        match e.get_entry_type() {
            EntryType::EntryNormal => {
                if !e.data.is_empty() {
                    normal.push(CommittedEntry {
                        index: e.index,
                        term: e.term,
                        data: e.data,
                    });
                }
            }
            EntryType::EntryConfChange => {
                if !normal.is_empty() {
                    sm.apply(std::mem::take(&mut normal))?;
                }
                let mut cc = ConfChange::default();
                cc.merge_from_bytes(&e.data)
                    .map_err(|err| format!("conf change entry {}: {err}", e.index))?;
                sm.apply_conf_change(e.index, &cc)?;
            }
            // Never proposed here (no joint consensus); raft-rs applied it already.
            EntryType::EntryConfChangeV2 => {}
        }
    }
    if !normal.is_empty() {
        sm.apply(normal)?;
    }
    Ok(())
}

/// Captures the state machine for a follower and writes it on a thread of its own; the raft
/// storage offers it once the file is complete.
fn build_snapshot(sm: &mut dyn StateMachine, storage: &WalStorage, terms: &TermStarts) {
    let transfers = storage.transfers().clone();
    let captured = sm.capture_snapshot().and_then(|(index, writer)| {
        let term = match terms.term_at(index) {
            Some(term) => term,
            None => storage
                .term(index)
                .map_err(|e| SnapshotBuildError::Term(index, e))?,
        };
        // The membership as of the captured index: a later change is in the log after it.
        let conf_state = storage.conf_state_at(index);
        Ok((index, writer, term, conf_state))
    });
    let (index, writer, term, conf_state) = match captured {
        Ok(captured) => captured,
        Err(e) => {
            tracing::warn!(error = %e, "cannot capture a snapshot for a follower");
            transfers.build_failed();
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("snapshot-send".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let path = transfers.send_path(index);
            let tmp = path.with_extension("tmp");
            let written = (|| -> Result<crate::SnapshotFile, StateMachineError> {
                std::fs::create_dir_all(transfers.send_dir())?;
                writer(&tmp)?;
                let file = crate::SnapshotFile::of(&tmp)?;
                std::fs::rename(&tmp, &path)?;
                Ok(file)
            })();
            match written {
                Ok(file) => {
                    let mut snap = Snapshot::default();
                    snap.set_data(file.encode().into());
                    let meta = snap.mut_metadata();
                    meta.index = index;
                    meta.term = term;
                    meta.set_conf_state(conf_state);
                    tracing::info!(
                        index,
                        term,
                        bytes = file.size,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "snapshot for followers written"
                    );
                    transfers.built(snap, path);
                }
                Err(e) => {
                    tracing::warn!(index, error = %e, "cannot write a snapshot for a follower");
                    let _ = std::fs::remove_file(&tmp);
                    transfers.build_failed();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the snapshot thread");
        storage.transfers().build_failed();
    }
}

/// Why a snapshot for a follower could not be captured.
#[derive(Debug, thiserror::Error)]
enum SnapshotBuildError {
    #[error("no term for index {0}: {1}")]
    Term(u64, #[source] raft::Error),
}

/// Marks the member stopped with `err` and wakes every reader waiting on the applied index:
/// going on would apply entries onto a state that can no longer be trusted.
fn stop_member(shared: &Shared, err: RaftError) {
    *shared.failure.lock() = Some(err);
    shared.stopped.store(true, Ordering::Release);
    shared.applied.send_modify(|_| {});
}

/// The first index of every term among the entries applied so far: the term of the durable
/// index, which the WAL's snapshot record needs, without asking raft's in-memory log (which
/// may already have trimmed it away while a slow snapshot was written).
#[derive(Default)]
struct TermStarts(std::collections::BTreeMap<u64, u64>);

impl TermStarts {
    fn record(&mut self, index: u64, term: u64) {
        if self.0.last_key_value().is_none_or(|(_, &t)| t != term) {
            self.0.insert(index, term);
        }
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        self.0.range(..=index).next_back().map(|(_, &t)| t)
    }

    /// Keeps only what can still be asked: the term holding `index` and later ones.
    fn forget_below(&mut self, index: u64) {
        if let Some((&start, _)) = self.0.range(..=index).next_back() {
            self.0 = self.0.split_off(&start);
        }
    }
}
