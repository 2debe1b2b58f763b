//! The raft thread: the raft-rs Ready loop, ReadIndex rounds, log trimming and compaction.

use crate::apply::ApplyInput;
use crate::{Input, RaftError, Shared, Transport, WalStorage};
use flume::{Receiver, RecvTimeoutError, Sender};
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType};
use raft::prelude::Entry;
use raft::{RawNode, SnapshotStatus, StateRole};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub(crate) struct Driver {
    raw: RawNode<WalStorage>,
    shared: Arc<Shared>,
    rx: Receiver<Input>,
    transport: Arc<dyn Transport>,
    apply_tx: Sender<ApplyInput>,
    tick_interval: Duration,
    catch_up_entries: u64,
    catch_up_bytes: u64,
    max_apply_backlog: u64,
    pending_reads: Vec<oneshot::Sender<Result<u64, RaftError>>>,
    inflight_reads: HashMap<Vec<u8>, InflightRead>,
    read_seq: u64,
    last_term: u64,
    last_term_published: u64,
    trimmed_below: u64,
    campaign_at_start: bool,
    witness: bool,
}

/// A ReadIndex round issued to raft and not answered yet.
struct InflightRead {
    waiters: Vec<oneshot::Sender<Result<u64, RaftError>>>,
    sent_at: Instant,
}

/// raft-rs drops a ReadIndex silently (a follower whose request to the leader was lost, a
/// leader that has not committed in its term): issue it again after this long, as etcd does.
const READ_INDEX_RETRY: Duration = Duration::from_millis(500);

/// Trim in steps, not on every Ready.
const TRIM_STEP: u64 = 1_000;

impl Driver {
    pub(crate) fn new(
        raw: RawNode<WalStorage>,
        shared: Arc<Shared>,
        rx: Receiver<Input>,
        transport: Arc<dyn Transport>,
        apply_tx: Sender<ApplyInput>,
        config: &crate::RaftConfig,
    ) -> Self {
        Self {
            raw,
            shared,
            rx,
            transport,
            apply_tx,
            tick_interval: config.tick_interval,
            catch_up_entries: config.snapshot_catch_up_entries,
            catch_up_bytes: config.snapshot_catch_up_bytes,
            max_apply_backlog: config.max_apply_backlog_bytes,
            pending_reads: Vec::new(),
            inflight_reads: HashMap::new(),
            read_seq: 0,
            last_term: 0,
            last_term_published: 0,
            trimmed_below: 0,
            campaign_at_start: false,
            witness: config.witness,
        }
    }

    /// Campaign as soon as the log present at start is handed to the apply thread: raft-rs
    /// refuses to campaign while committed membership changes (a new cluster's bootstrap
    /// entries) are not applied.
    pub(crate) fn campaign_at_start(mut self, yes: bool) -> Self {
        self.campaign_at_start = yes;
        self
    }

    pub(crate) fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        let mut started = self.drain_ready();
        if started.is_ok() && self.campaign_at_start {
            started = self
                .raw
                .campaign()
                .map_err(RaftError::from)
                .and_then(|()| self.drain_ready());
        }
        if let Err(e) = started {
            tracing::error!(error = %e, "raft loop failed at start; stopping this member");
            *self.shared.failure.lock() = Some(e);
            self.shared.stopped.store(true, Ordering::Release);
            self.shared.applied.send_modify(|_| {});
            return;
        }
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(Input::Shutdown) => break,
                Ok(input) => {
                    if !self.handle(input) {
                        break;
                    }
                    // Take everything already queued: all of it shares the next Ready, and so
                    // one WAL fsync.
                    let mut stop = false;
                    while let Ok(input) = self.rx.try_recv() {
                        if matches!(input, Input::Shutdown) || !self.handle(input) {
                            stop = true;
                            break;
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                self.retry_reads();
                self.hand_off_if_witness();
                next_tick += self.tick_interval;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.tick_interval;
                }
            }
            if self.shared.stopped.load(Ordering::Acquire) {
                // The apply loop failed: going on would acknowledge nothing.
                break;
            }
            if let Err(e) = self.drain_ready() {
                tracing::error!(error = %e, "raft loop failed; stopping this member");
                *self.shared.failure.lock() = Some(e);
                break;
            }
        }
        self.shared.stopped.store(true, Ordering::Release);
        // Wake every reader waiting on the applied index: they fail now, not at their timeout.
        self.shared.applied.send_modify(|_| {});
        let err = self
            .shared
            .failure
            .lock()
            .clone()
            .unwrap_or(RaftError::Stopped);
        for tx in self.pending_reads.drain(..) {
            let _ = tx.send(Err(err.clone()));
        }
        for (_, read) in self.inflight_reads.drain() {
            for tx in read.waiters {
                let _ = tx.send(Err(err.clone()));
            }
        }
    }

    /// Returns false when the loop must stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Propose(data, reply) => {
                let result = match self.raw.propose(vec![], data) {
                    Ok(()) => Ok(()),
                    Err(raft::Error::ProposalDropped)
                        if self.raw.raft.leader_id == raft::INVALID_ID =>
                    {
                        Err(RaftError::NoLeader)
                    }
                    Err(raft::Error::ProposalDropped) => Err(RaftError::ProposalDropped),
                    Err(e) => Err(RaftError::from(e)),
                };
                let _ = reply.send(result);
            }
            Input::ReadIndex(reply) => self.pending_reads.push(reply),
            Input::Step(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "raft step rejected a message");
                }
            }
            Input::Compact { index, term } => match self.raw.store().compact_log(index, term) {
                Ok(removed) => {
                    tracing::debug!(index, removed, "raft log compacted");
                }
                Err(e) => tracing::warn!(index, error = %e, "cannot compact the raft log"),
            },
            Input::Unreachable(peer) => self.raw.report_unreachable(peer),
            Input::SnapshotStatus(peer, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    // raft-rs then probes the follower again, which asks for a snapshot anew.
                    self.raw.report_unreachable(peer);
                    SnapshotStatus::Failure
                };
                tracing::info!(peer = format_args!("{peer:x}"), ok, "snapshot send ended");
                self.raw.report_snapshot(peer, status);
            }
            Input::ProposeConfChange(cc, reply) => {
                let _ = reply.send(self.propose_conf_change(cc));
            }
            Input::Removed => {
                self.shared.removed.store(true, Ordering::Release);
            }
            Input::TransferLeader(to) => {
                if self.raw.raft.state == StateRole::Leader {
                    tracing::info!(to = format_args!("{to:x}"), "transferring leadership");
                    self.raw.transfer_leader(to);
                }
            }
            Input::Progress(reply) => {
                let progress = (self.raw.raft.state == StateRole::Leader).then(|| {
                    self.raw
                        .raft
                        .prs()
                        .iter()
                        .map(|(id, pr)| (*id, pr.matched))
                        .collect()
                });
                let _ = reply.send(progress);
            }
            // Only wakes the loop: `drain_ready` looks at the backlog again.
            Input::Applied => {}
            Input::Shutdown => return false,
        }
        true
    }

    /// A witness that was elected (its log was as long as any) hands leadership at once to the
    /// data member whose log matches the most of it.
    fn hand_off_if_witness(&mut self) {
        if !self.witness
            || self.raw.raft.state != StateRole::Leader
            || self.raw.raft.lead_transferee.is_some()
        {
            return;
        }
        let me = self.shared.id;
        let voters = self.shared.membership.borrow().voters.clone();
        let target = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && voters.contains(id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id);
        if let Some(to) = target {
            tracing::info!(
                to = format_args!("{to:x}"),
                "a witness does not lead: handing leadership over"
            );
            self.raw.transfer_leader(to);
        }
    }

    fn propose_conf_change(&mut self, cc: ConfChange) -> Result<u64, RaftError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(RaftError::NotLeader);
        }
        if self.raw.raft.has_pending_conf() {
            // raft-rs would turn it into an empty entry and say nothing.
            return Err(RaftError::ConfChangePending);
        }
        self.raw
            .propose_conf_change(vec![], cc)
            .map_err(|e| match e {
                raft::Error::ProposalDropped => RaftError::ProposalDropped,
                e => RaftError::from(e),
            })?;
        Ok(self.raw.raft.raft_log.last_index())
    }

    /// Records a committed membership change raft has applied: in the WAL (from `index` on),
    /// for readers, and, when it removes this member, as the signal to stop.
    fn record_conf_change(
        &mut self,
        index: u64,
        cs: raft::eraftpb::ConfState,
        removed: Option<u64>,
    ) -> Result<(), RaftError> {
        self.shared.membership.send_replace(crate::Membership {
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        });
        self.raw.store().set_conf_state(index, cs)?;
        if removed == Some(self.shared.id) {
            tracing::warn!(index, "this member was removed from the cluster");
            self.shared.removed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Starts one ReadIndex round for every read waiting now, once a leader that has
    /// committed in its term exists (raft-rs drops read requests before that).
    fn issue_reads(&mut self) {
        if self.pending_reads.is_empty() || self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            return;
        }
        self.read_seq += 1;
        let ctx = self.read_seq.to_be_bytes().to_vec();
        self.raw.read_index(ctx.clone());
        let waiters = std::mem::take(&mut self.pending_reads);
        self.inflight_reads.insert(
            ctx,
            InflightRead {
                waiters,
                sent_at: Instant::now(),
            },
        );
    }

    /// Issues again every ReadIndex round unanswered for `READ_INDEX_RETRY`, under its own
    /// context: an answer to any of the sends completes it.
    fn retry_reads(&mut self) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let now = Instant::now();
        let stale: Vec<Vec<u8>> = self
            .inflight_reads
            .iter()
            .filter(|(_, r)| now.duration_since(r.sent_at) >= READ_INDEX_RETRY)
            .map(|(ctx, _)| ctx.clone())
            .collect();
        for ctx in stale {
            self.raw.read_index(ctx.clone());
            if let Some(read) = self.inflight_reads.get_mut(&ctx) {
                read.sent_at = now;
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        self.handle_committed(ready.take_committed_entries())?;
        let store = self.raw.store().clone();
        store.persist(ready.entries(), ready.hs(), ready.must_sync())?;
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        for rs in ready.take_read_states() {
            if let Some(read) = self.inflight_reads.remove(&rs.request_ctx) {
                for tx in read.waiters {
                    let _ = tx.send(Ok(rs.index));
                }
            }
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.set_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.handle_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    /// A snapshot from the leader: the apply thread installs it (after every entry queued
    /// before it), and only once the state machine holds it durably is it recorded in the
    /// WAL, so that a crash in between restarts from the old, consistent log. The raft thread
    /// waits meanwhile: this member has nothing to acknowledge until it holds the new state.
    fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<(), RaftError> {
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let transfers = self.raw.store().transfers().clone();
        let path = transfers.recv_path(index);
        tracing::info!(index, term, file = %path.display(), "installing the leader's snapshot");
        let started = Instant::now();
        let (reply_tx, reply_rx) = flume::bounded(1);
        self.apply_tx
            .send(ApplyInput::Install {
                path: path.clone(),
                index,
                term,
                reply: reply_tx,
            })
            .map_err(|_| RaftError::Stopped)?;
        reply_rx.recv().map_err(|_| RaftError::Stopped)??;
        self.raw.store().apply_snapshot(snap)?;
        transfers.clean_received(None);
        self.trimmed_below = index;
        self.shared.commit.fetch_max(index, Ordering::AcqRel);
        self.shared.last_index.fetch_max(index, Ordering::AcqRel);
        tracing::info!(
            index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the leader's snapshot is installed"
        );
        Ok(())
    }

    fn handle_committed(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    let cc: ConfChange = decode_conf_change(e)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    let removed = (cc.get_change_type()
                        == raft::eraftpb::ConfChangeType::RemoveNode)
                        .then_some(cc.node_id);
                    self.record_conf_change(e.index, cs, removed)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc: ConfChangeV2 = decode_conf_change(e)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    let removed = cc
                        .changes
                        .iter()
                        .find(|c| {
                            c.get_change_type() == raft::eraftpb::ConfChangeType::RemoveNode
                                && c.node_id == self.shared.id
                        })
                        .map(|c| c.node_id);
                    self.record_conf_change(e.index, cs, removed)?;
                }
            }
        }
        if let Some(last) = entries.last().map(|e| e.index) {
            // Published before the apply thread can answer for these entries: a client whose
            // write was acknowledged must not then read an older raft index (Status) than the
            // applied one. `publish` only runs after this whole Ready.
            self.shared.commit.fetch_max(last, Ordering::AcqRel);
            self.shared.last_index.fetch_max(last, Ordering::AcqRel);
        }
        self.shared
            .apply_backlog_bytes
            .fetch_add(crate::apply::backlog_bytes(&entries), Ordering::SeqCst);
        self.apply_tx
            .send(ApplyInput::Entries(entries))
            .map_err(|_| RaftError::Stopped)
    }

    /// Applying lags too far behind committing: take no Ready, so that no more committed
    /// entries queue for the apply thread, until it catches up. Messages and proposals are
    /// still stepped, so a follower keeps its leader; what raft would send waits with the
    /// Ready. The apply thread sends `Input::Applied` while `apply_held` is set.
    fn apply_backlog_full(&self) -> bool {
        let over = |backlog: u64| backlog >= self.max_apply_backlog;
        let backlog = self.shared.apply_backlog_bytes.load(Ordering::SeqCst);
        if !over(backlog) {
            // `apply_held` is also what admission control reads: it must never be set, not
            // even for an instant, while the backlog is under its bound.
            if self.shared.apply_held.load(Ordering::SeqCst) {
                self.shared.apply_held.store(false, Ordering::SeqCst);
            }
            return false;
        }
        // Held first, backlog read again second (both SeqCst), against the apply thread's
        // decrement then read of `apply_held`: one of the two sides sees the other, so no
        // wake is lost.
        let was_held = self.shared.apply_held.swap(true, Ordering::SeqCst);
        let backlog = self.shared.apply_backlog_bytes.load(Ordering::SeqCst);
        if !over(backlog) {
            self.shared.apply_held.store(false, Ordering::SeqCst);
            return false;
        }
        if !was_held {
            tracing::debug!(
                backlog,
                bound = self.max_apply_backlog,
                "apply backlog full: waiting for the apply thread"
            );
        }
        true
    }

    /// Handles Readies until raft has nothing more, so no leftover work waits for a tick.
    fn drain_ready(&mut self) -> Result<(), RaftError> {
        loop {
            if self.apply_backlog_full() {
                return Ok(());
            }
            self.issue_reads();
            self.on_ready()?;
            self.publish();
            if self.raw.store().transfers().take_request() {
                self.apply_tx
                    .send(ApplyInput::BuildSnapshot)
                    .map_err(|_| RaftError::Stopped)?;
            }
            if !self.raw.has_ready() {
                return Ok(());
            }
        }
    }

    fn fail_inflight_reads(&mut self) {
        for (_, read) in self.inflight_reads.drain() {
            for tx in read.waiters {
                let _ = tx.send(Err(RaftError::NoLeader));
            }
        }
    }

    fn publish(&mut self) {
        let term = self.raw.raft.term;
        let leader = self.raw.raft.leader_id;
        let leader_changed = self.shared.leader.swap(leader, Ordering::AcqRel) != leader;
        if (term != self.last_term && self.last_term != 0) || leader_changed {
            // raft-rs drops its read queue when leadership moves (a CheckQuorum step-down
            // keeps the term): reads in flight may never be answered.
            self.fail_inflight_reads();
        }
        self.last_term = term;
        if leader_changed {
            tracing::info!(term, leader, id = self.shared.id, "raft leader changed");
            if leader != 0 {
                // As etcd counts them: every new leader seen, not the leaderless gaps.
                metrics::counter!("etcd_server_leader_changes_seen_total").increment(1);
            }
        }
        if leader_changed || term != self.last_term_published {
            self.last_term_published = term;
            self.shared.term.store(term, Ordering::Release);
            self.shared.leadership.send_replace((term, leader));
        }
        let raft = &self.raw.raft;
        self.shared.term.store(term, Ordering::Release);
        self.shared
            .commit
            .store(raft.raft_log.committed, Ordering::Release);
        self.shared
            .last_index
            .store(raft.raft_log.last_index(), Ordering::Release);
        let applied = *self.shared.applied.borrow();
        // The entries kept in memory are for followers that fall a little behind. A member
        // alone in its configuration has none, and one added later starts from a snapshot:
        // keeping them held up to 256 MiB for nobody (a million keys loaded in txns of 100
        // kept ~230 MiB, as much as the keys themselves).
        let me = self.shared.id;
        let alone = self.raw.raft.prs().iter().all(|(id, _)| *id == me);
        let by_count = if alone {
            applied
        } else {
            applied.saturating_sub(self.catch_up_entries)
        };
        let by_bytes = self
            .raw
            .store()
            .trim_point_for_bytes(self.catch_up_bytes, applied);
        let trim_to = by_count.max(by_bytes);
        if by_bytes > self.trimmed_below
            || trim_to >= self.trimmed_below + TRIM_STEP.min(self.catch_up_entries.max(1))
        {
            match self.raw.store().trim_memory(trim_to) {
                Ok(()) => self.trimmed_below = trim_to,
                Err(e) => tracing::warn!(error = %e, trim_to, "cannot trim the in-memory raft log"),
            }
        }
        self.shared
            .log_bytes_in_memory
            .store(self.raw.store().cached_bytes(), Ordering::Release);
    }
}

/// A committed membership change entry's payload (either version of the message).
fn decode_conf_change<M: protobuf::Message + Default>(e: &Entry) -> Result<M, RaftError> {
    let mut cc = M::default();
    cc.merge_from_bytes(&e.data)
        .map_err(|err| RaftError::UndecodableConfChange {
            index: e.index,
            source: Arc::new(err),
        })?;
    Ok(cc)
}
