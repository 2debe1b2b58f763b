//! The apply thread: committed entries to the state machine, durability back to the raft
//! thread; and the guard that marks the member stopped when either thread ends.

use crate::{CommittedEntry, Input, RaftError, Shared, StateMachine};
use flume::{Receiver, Sender};
use raft::eraftpb::EntryType;
use raft::prelude::Entry;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
                *failure = Some(RaftError::Raft(format!(
                    "the {} thread panicked",
                    self.thread
                )));
            }
        }
        self.shared.stopped.store(true, Ordering::Release);
        // Wake every reader waiting on the applied index and every proposal or ReadIndex
        // waiting for an answer: they fail now.
        self.shared.applied.send_modify(|_| {});
        self.shared.stop_notify.notify_waiters();
    }
}

pub(crate) fn apply_loop(
    shared: Arc<Shared>,
    mut sm: Box<dyn StateMachine>,
    rx: Receiver<Vec<Entry>>,
    raft_tx: Sender<Input>,
) {
    let mut durable = sm.durable_index();
    let mut terms = TermStarts::default();
    while let Ok(mut entries) = rx.recv() {
        // Coalesce what is queued into one call: fewer engine batches under load.
        while let Ok(more) = rx.try_recv() {
            entries.extend(more);
        }
        let Some(last) = entries.last().map(|e| e.index) else {
            continue;
        };
        for e in &entries {
            terms.record(e.index, e.term);
        }
        let normal: Vec<CommittedEntry> = entries
            .into_iter()
            .filter(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty())
            .map(|e| CommittedEntry {
                index: e.index,
                term: e.term,
                data: e.data,
            })
            .collect();
        if !normal.is_empty() {
            if let Err(e) = sm.apply(normal) {
                tracing::error!(error = %e, "state machine failed; stopping this member");
                *shared.failure.lock() = Some(RaftError::StateMachine(e));
                shared.stopped.store(true, Ordering::Release);
                shared.applied.send_modify(|_| {});
                return;
            }
        }
        shared.applied.send_replace(last);
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
