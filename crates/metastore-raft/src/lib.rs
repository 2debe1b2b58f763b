//! A Raft member on raft-rs, persisted to `metastore-wal`.
//!
//! One thread runs the raft-rs Ready loop: it steps messages and proposals, persists new entries
//! and hard state to the WAL (one fsync per Ready however many entries it holds — group commit),
//! sends messages through a [`Transport`], and hands committed entries to an apply thread that
//! feeds the [`StateMachine`]. Linearizable reads go through [`RaftNode::read_index`]: every read
//! waiting at the same moment shares one ReadIndex round.
//!
//! Peers are a trait: the node is written for N members; a single member uses [`NoPeers`].

mod storage;

use flume::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message};
use raft::prelude::Entry;
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

pub use raft::eraftpb;
pub use storage::WalStorage;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    #[error("no leader")]
    NoLeader,
    #[error("proposal dropped")]
    ProposalDropped,
    #[error("raft node stopped")]
    Stopped,
    #[error("wal: {0}")]
    Wal(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("state machine failed: {0}")]
    StateMachine(String),
}

/// Raft settings; defaults follow the performance plans.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RaftConfig {
    /// One raft tick.
    #[serde(with = "millis")]
    pub tick_interval: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub max_inflight_msgs: usize,
    pub max_size_per_msg: u64,
    pub max_uncommitted_size: u64,
    /// Upper bound of committed entry bytes handed over in one Ready.
    pub max_committed_size_per_ready: u64,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// fsync the WAL before acknowledging (never turn off outside benchmarks).
    pub wal_sync: bool,
    /// Zero-fill WAL segments in advance (see `metastore_wal::WalOptions::preallocate`).
    pub wal_preallocate: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_interval: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            max_inflight_msgs: 512,
            max_size_per_msg: 4 * 1024 * 1024,
            max_uncommitted_size: 1 << 30,
            max_committed_size_per_ready: 64 * 1024 * 1024,
            wal_segment_size: 64 * 1024 * 1024,
            wal_sync: true,
            wal_preallocate: true,
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Sends raft messages to other members. Implementations must not block the raft loop.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
}

/// The transport of a single-member cluster: there is nobody to talk to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            tracing::warn!(
                count = msgs.len(),
                "dropping raft messages: no peers configured"
            );
        }
    }
}

/// A committed normal entry with a payload.
#[derive(Debug, Clone)]
pub struct CommittedEntry {
    pub index: u64,
    pub term: u64,
    /// The entry's payload, shared with raft's in-memory log rather than copied.
    pub data: bytes::Bytes,
}

/// Receives committed entries, in log order, on the apply thread.
pub trait StateMachine: Send + 'static {
    /// Applies entries. An error stops the node: it must not go on with a state it cannot trust.
    fn apply(&mut self, entries: Vec<CommittedEntry>) -> Result<(), String>;
    /// The last raft index reflected in the state machine (what survives a restart).
    fn applied_index(&self) -> u64;

    /// The last index the state machine holds durably on its own (a snapshot file, a flushed
    /// engine): the WAL at or below it is no longer needed and is purged.
    fn durable_index(&self) -> u64 {
        0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub is_leader: bool,
}

enum Input {
    Propose(Vec<u8>, oneshot::Sender<Result<(), RaftError>>),
    ReadIndex(oneshot::Sender<Result<u64, RaftError>>),
    Step(Box<Message>),
    /// The state machine holds everything up to this index durably.
    Compact(u64),
    Shutdown,
}

struct Shared {
    id: u64,
    term: AtomicU64,
    leader: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    stopped: AtomicBool,
    applied: watch::Sender<u64>,
    /// Last log index found at start: what a restarted member re-applies before serving.
    replay_target: u64,
    failure: Mutex<Option<RaftError>>,
}

/// Handle to a running raft member. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    shared: Arc<Shared>,
    tx: Sender<Input>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl RaftNode {
    /// Opens the WAL in `wal_dir`, restores the log, and starts the raft and apply threads.
    /// `voters` is the initial membership, used only when the WAL is new.
    pub fn start(
        id: u64,
        voters: Vec<u64>,
        wal_dir: impl Into<PathBuf>,
        config: RaftConfig,
        transport: Arc<dyn Transport>,
        state_machine: Box<dyn StateMachine>,
    ) -> Result<RaftNode, RaftError> {
        let storage = WalStorage::open(wal_dir.into(), &config, &voters)?;
        if state_machine.applied_index() < storage.snapshot_index() {
            // The WAL below that point is gone: starting would silently skip those entries.
            return Err(RaftError::Wal(format!(
                "the state machine holds index {} but the WAL was compacted up to {}: its snapshot or engine data is missing",
                state_machine.applied_index(),
                storage.snapshot_index()
            )));
        }
        let applied = state_machine
            .applied_index()
            .max(storage.snapshot_index())
            .min(storage.committed());
        let raft_cfg = raft::Config {
            id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: config.check_quorum,
            pre_vote: config.pre_vote,
            max_uncommitted_size: config.max_uncommitted_size,
            max_committed_size_per_ready: config.max_committed_size_per_ready,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let single_voter = storage.voters() == [id];
        let mut raw = RawNode::new(&raft_cfg, storage, &logger)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        if single_voter {
            // Alone, there is nobody to wait for: take leadership now instead of after an
            // election timeout.
            raw.campaign().map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        let replay_target = raw.raft.raft_log.last_index();
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            id,
            term: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            last_index: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            applied: applied_tx,
            replay_target,
            failure: Mutex::new(None),
        });
        // flume's blocking receive parks at once. crossbeam-channel's spins and then calls
        // sched_yield (measured: 0.12 calls per put at 256 clients), which gives the core to
        // whichever thread is runnable and costs a context switch each time.
        let (tx, rx) = flume::unbounded();
        let (apply_tx, apply_rx) = flume::unbounded();
        let apply_thread = {
            let shared = shared.clone();
            let raft_tx = tx.clone();
            std::thread::Builder::new()
                .name("raft-apply".into())
                .spawn(move || apply_loop(shared, state_machine, apply_rx, raft_tx))
                .map_err(|e| RaftError::Raft(e.to_string()))?
        };
        let raft_thread = {
            let shared = shared.clone();
            let mut driver = Driver {
                raw,
                shared,
                rx,
                transport,
                apply_tx,
                tick_interval: config.tick_interval,
                pending_reads: Vec::new(),
                inflight_reads: HashMap::new(),
                read_seq: 0,
                last_term: 0,
                trimmed_below: 0,
            };
            std::thread::Builder::new()
                .name("raft".into())
                .spawn(move || driver.run())
                .map_err(|e| RaftError::Raft(e.to_string()))?
        };
        Ok(RaftNode {
            shared,
            tx,
            threads: Arc::new(Mutex::new(vec![raft_thread, apply_thread])),
        })
    }

    fn stopped_error(&self) -> RaftError {
        self.shared
            .failure
            .lock()
            .clone()
            .unwrap_or(RaftError::Stopped)
    }

    /// Appends `data` to the log as this member's proposal. Resolves once the raft loop has
    /// taken it (not when it is committed: the caller learns that from the state machine).
    pub async fn propose(&self, data: Vec<u8>) -> Result<(), RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose(data, tx))
            .map_err(|_| self.stopped_error())?;
        rx.await.map_err(|_| self.stopped_error())?
    }

    /// Confirms leadership with a ReadIndex round shared by every read waiting now; returns
    /// the index the state machine must reach before a linearizable read may be served.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::ReadIndex(tx))
            .map_err(|_| self.stopped_error())?;
        rx.await.map_err(|_| self.stopped_error())?
    }

    /// Waits until the state machine has applied `index`; fails at once if the member stops.
    pub async fn wait_applied(&self, index: u64) -> Result<(), RaftError> {
        let mut rx = self.shared.applied.subscribe();
        let shared = self.shared.clone();
        let reached = rx
            .wait_for(|&a| a >= index || shared.stopped.load(Ordering::Acquire))
            .await
            .map(|a| *a >= index)
            .unwrap_or(false);
        if reached {
            Ok(())
        } else {
            Err(self.stopped_error())
        }
    }

    /// Waits until everything in the log at start has been re-applied, so that no read is
    /// served from a state older than the one before the restart.
    pub async fn wait_replayed(&self) -> Result<(), RaftError> {
        self.wait_applied(self.shared.replay_target).await
    }

    /// A linearizable read barrier: ReadIndex, then wait for the apply loop to catch up.
    pub async fn linearizable_barrier(&self) -> Result<(), RaftError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await
    }

    /// Delivers a message from a peer.
    pub fn step(&self, msg: Message) -> Result<(), RaftError> {
        self.tx
            .send(Input::Step(Box::new(msg)))
            .map_err(|_| self.stopped_error())
    }

    pub fn status(&self) -> RaftStatus {
        let leader_id = self.shared.leader.load(Ordering::Acquire);
        RaftStatus {
            id: self.shared.id,
            term: self.shared.term.load(Ordering::Acquire),
            leader_id,
            commit_index: self.shared.commit.load(Ordering::Acquire),
            applied_index: *self.shared.applied.borrow(),
            last_index: self.shared.last_index.load(Ordering::Acquire),
            is_leader: leader_id == self.shared.id,
        }
    }

    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Acquire)
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Stops both threads after the work in hand; waits for them.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

struct Driver {
    raw: RawNode<WalStorage>,
    shared: Arc<Shared>,
    rx: Receiver<Input>,
    transport: Arc<dyn Transport>,
    apply_tx: Sender<Vec<Entry>>,
    tick_interval: Duration,
    pending_reads: Vec<oneshot::Sender<Result<u64, RaftError>>>,
    inflight_reads: HashMap<Vec<u8>, Vec<oneshot::Sender<Result<u64, RaftError>>>>,
    read_seq: u64,
    last_term: u64,
    trimmed_below: u64,
}

/// Applied entries kept in memory for lagging followers before the in-memory log is trimmed.
const CATCH_UP_ENTRIES: u64 = 10_000;
/// Trim in steps, not on every Ready.
const TRIM_STEP: u64 = 1_000;

impl Driver {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        // A campaign started before the loop is processed now, not a tick later.
        if let Err(e) = self.drain_ready() {
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
        for (_, waiters) in self.inflight_reads.drain() {
            for tx in waiters {
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
                    Err(e) => Err(RaftError::Raft(e.to_string())),
                };
                let _ = reply.send(result);
            }
            Input::ReadIndex(reply) => self.pending_reads.push(reply),
            Input::Step(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "raft step rejected a message");
                }
            }
            Input::Compact(index) => match self.raw.store().compact_log(index) {
                Ok(removed) => {
                    tracing::debug!(index, removed, "raft log compacted");
                }
                Err(e) => tracing::warn!(index, error = %e, "cannot compact the raft log"),
            },
            Input::Shutdown => return false,
        }
        true
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
        self.inflight_reads.insert(ctx, waiters);
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
            return Err(RaftError::Raft(
                "installing a snapshot from the leader is not supported yet".into(),
            ));
        }
        self.handle_committed(ready.take_committed_entries())?;
        let store = self.raw.store().clone();
        store.persist(ready.entries(), ready.hs(), ready.must_sync())?;
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        for rs in ready.take_read_states() {
            if let Some(waiters) = self.inflight_reads.remove(&rs.request_ctx) {
                for tx in waiters {
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

    fn handle_committed(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(&e.data)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    self.raw.store().set_conf_state(cs)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    cc.merge_from_bytes(&e.data)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    self.raw.store().set_conf_state(cs)?;
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
        self.apply_tx.send(entries).map_err(|_| RaftError::Stopped)
    }

    /// Handles Readies until raft has nothing more, so no leftover work waits for a tick.
    fn drain_ready(&mut self) -> Result<(), RaftError> {
        loop {
            self.issue_reads();
            self.on_ready()?;
            self.publish();
            if !self.raw.has_ready() {
                return Ok(());
            }
        }
    }

    fn fail_inflight_reads(&mut self) {
        for (_, waiters) in self.inflight_reads.drain() {
            for tx in waiters {
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
        let trim_to = applied.saturating_sub(CATCH_UP_ENTRIES);
        if trim_to >= self.trimmed_below + TRIM_STEP {
            match self.raw.store().trim_memory(trim_to) {
                Ok(()) => self.trimmed_below = trim_to,
                Err(e) => tracing::warn!(error = %e, trim_to, "cannot trim the in-memory raft log"),
            }
        }
    }
}

fn apply_loop(
    shared: Arc<Shared>,
    mut sm: Box<dyn StateMachine>,
    rx: Receiver<Vec<Entry>>,
    raft_tx: Sender<Input>,
) {
    let mut durable = sm.durable_index();
    while let Ok(mut entries) = rx.recv() {
        // Coalesce what is queued into one call: fewer engine batches under load.
        while let Ok(more) = rx.try_recv() {
            entries.extend(more);
        }
        let Some(last) = entries.last().map(|e| e.index) else {
            continue;
        };
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
            let _ = raft_tx.send(Input::Compact(durable));
        }
    }
}
