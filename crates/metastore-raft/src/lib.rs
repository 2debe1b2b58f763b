//! A Raft member on raft-rs, persisted to `metastore-wal`.
//!
//! One thread runs the raft-rs Ready loop: it steps messages and proposals, persists new entries
//! and hard state to the WAL (one fsync per Ready however many entries it holds — group commit),
//! sends messages through a [`Transport`], and hands committed entries to an apply thread that
//! feeds the [`StateMachine`]. Linearizable reads go through [`RaftNode::read_index`]: every read
//! waiting at the same moment shares one ReadIndex round.
//!
//! Peers are a trait: the node is written for N members; a single member uses [`NoPeers`].

mod apply;
mod config;
mod driver;
mod entry_cache;
mod error;
mod storage;
mod transfer;
pub mod witness;

use apply::{apply_loop, StopOnExit};
use driver::Driver;

use flume::Sender;
use parking_lot::Mutex;
use raft::eraftpb::Message;
use raft::{RawNode, Storage as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

pub use config::RaftConfig;
pub use error::{RaftError, StateMachineError};
pub use raft::eraftpb;
pub use storage::{Bootstrap, WalStorage};
use transfer::Transfers;
pub use transfer::{received_snapshot_path, transfer_dir, SnapshotFile};

/// Sends raft messages to other members. Implementations must not block the raft loop.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);

    /// Called once, before the raft thread runs: how the transport tells raft what it learns
    /// (a peer it cannot reach), so that replication to that peer is probed again instead of
    /// waiting on messages that were dropped.
    fn bind(&self, _feedback: PeerFeedback) {}
}

/// The transport's way back into the raft loop. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct PeerFeedback {
    tx: Sender<Input>,
    transfers: Arc<Transfers>,
}

impl PeerFeedback {
    /// Messages to `peer` were dropped (queue full, not connected): raft-rs moves that
    /// follower back to probing (`report_unreachable`).
    pub fn unreachable(&self, peer: u64) {
        let _ = self.tx.send(Input::Unreachable(peer));
    }

    /// The file that travels with a `MsgSnapshot` this member sends, and what it must be.
    pub fn snapshot_file(&self, msg: &Message) -> Option<(PathBuf, SnapshotFile)> {
        self.transfers.file_to_send(msg.get_snapshot())
    }

    /// A peer says this member was removed from the cluster (its own log may not have the
    /// change yet): the member stops, as when it applies its removal.
    pub fn removed(&self) {
        let _ = self.tx.send(Input::Removed);
    }

    /// The snapshot sent to `peer` arrived and was handed to its raft node (`ok`), or could
    /// not be sent: raft-rs resumes replicating to it (`report_snapshot`).
    pub fn snapshot_sent(&self, peer: u64, ok: bool) {
        let _ = self.tx.send(Input::SnapshotStatus(peer, ok));
    }
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
    fn apply(&mut self, entries: Vec<CommittedEntry>) -> Result<(), StateMachineError>;
    /// The last raft index reflected in the state machine (what survives a restart).
    fn applied_index(&self) -> u64;

    /// The last index the state machine holds durably on its own (a snapshot file, a flushed
    /// engine): the WAL at or below it is no longer needed and is purged.
    fn durable_index(&self) -> u64 {
        0
    }

    /// Captures the state as of the last applied entry for a follower that is too far behind
    /// the leader's log; returns the captured state's applied index and the job that writes it
    /// to a file (run on another thread while applying goes on).
    fn capture_snapshot(&mut self) -> Result<(u64, SnapshotWriter), StateMachineError> {
        Err("this state machine cannot send snapshots".into())
    }

    /// Applies a committed membership change at `index` (raft applied it already). Called in
    /// log order with the entries around it.
    fn apply_conf_change(
        &mut self,
        _index: u64,
        _change: &eraftpb::ConfChange,
    ) -> Result<(), StateMachineError> {
        Ok(())
    }

    /// Replaces the whole state with the snapshot file at `path`, taken at raft `index` by the
    /// leader's `capture_snapshot`. On success the state must be durable at `index`: the raft
    /// log before it is discarded next.
    fn install_snapshot(&mut self, _path: &Path, _index: u64) -> Result<(), StateMachineError> {
        Err("this state machine cannot install snapshots".into())
    }
}

/// Writes a captured state to the file at the path given (the whole file; the caller renames
/// it into place once complete).
pub type SnapshotWriter = Box<dyn FnOnce(&Path) -> Result<(), StateMachineError> + Send>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub is_leader: bool,
    /// Bytes of log entries held in memory (for followers to catch up from, and not yet
    /// applied ones).
    pub log_bytes_in_memory: u64,
    /// Committed entry bytes waiting for the apply thread.
    pub apply_backlog_bytes: u64,
    /// The raft thread waits for applying to catch up (`max_apply_backlog_bytes`).
    pub apply_held: bool,
}

/// The membership raft works with now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl Membership {
    pub fn contains(&self, id: u64) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

enum Input {
    Propose(Vec<u8>, oneshot::Sender<Result<(), RaftError>>),
    ReadIndex(oneshot::Sender<Result<u64, RaftError>>),
    Step(Box<Message>),
    /// The state machine holds everything up to `index` durably; `term` is its term when
    /// the apply loop saw the entry (None: applied before this process started).
    Compact {
        index: u64,
        term: Option<u64>,
    },
    /// The transport dropped messages to this peer.
    Unreachable(u64),
    /// A snapshot send to this peer ended: delivered (true) or failed.
    SnapshotStatus(u64, bool),
    /// A membership change, proposed only on the leader; answered with its log index.
    ProposeConfChange(eraftpb::ConfChange, oneshot::Sender<Result<u64, RaftError>>),
    /// A peer says this member was removed from the cluster.
    Removed,
    /// Hand leadership to this member (leader only; raft-rs ignores it elsewhere).
    TransferLeader(u64),
    /// How far each member's log matches the leader's (None: not the leader).
    Progress(oneshot::Sender<Option<std::collections::HashMap<u64, u64>>>),
    /// The apply thread applied entries while the raft thread was held: look again.
    Applied,
    Shutdown,
}

struct Shared {
    id: u64,
    term: AtomicU64,
    leader: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    log_bytes_in_memory: AtomicU64,
    /// Bytes of committed entries sent to the apply thread and not applied yet.
    apply_backlog_bytes: AtomicU64,
    /// The raft thread takes no Ready until the backlog falls under its bound; the apply
    /// thread wakes it (`Input::Applied`) as it goes.
    apply_held: AtomicBool,
    stopped: AtomicBool,
    applied: watch::Sender<u64>,
    /// Woken once when the member stops (after `stopped` is set).
    stop_notify: tokio::sync::Notify,
    /// (term, leader id), published when either changes; 0 = no leader.
    leadership: watch::Sender<(u64, u64)>,
    /// Last log index found at start: what a restarted member re-applies before serving.
    replay_target: u64,
    /// The membership raft works with, published at every change.
    membership: watch::Sender<Membership>,
    /// A committed change removed this member from the cluster.
    removed: AtomicBool,
    failure: Mutex<Option<RaftError>>,
}

/// Handle to a running raft member. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    shared: Arc<Shared>,
    wal_dir: Arc<PathBuf>,
    tx: Sender<Input>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl RaftNode {
    /// Opens the WAL in `wal_dir`, restores the log, and starts the raft and apply threads.
    /// `bootstrap` is used only when the WAL is new.
    pub fn start(
        id: u64,
        bootstrap: Bootstrap,
        wal_dir: impl Into<PathBuf>,
        config: RaftConfig,
        transport: Arc<dyn Transport>,
        state_machine: Box<dyn StateMachine>,
    ) -> Result<RaftNode, RaftError> {
        let wal_dir: PathBuf = wal_dir.into();
        let transfers = Arc::new(Transfers::new(&wal_dir));
        // Snapshots in transit do not outlive a restart: the state machine has installed what
        // it needed already (a persistent engine finishes an interrupted install before this),
        // and the leader asks for, or this member builds, new ones.
        transfers.clean_received(None);
        let _ = std::fs::remove_dir_all(transfers.send_dir());
        let storage = WalStorage::open(wal_dir.clone(), &config, &bootstrap, transfers.clone())?;
        if state_machine.applied_index() < storage.snapshot_index() {
            // The WAL below that point is gone: starting would silently skip those entries.
            return Err(RaftError::StateBehindWal {
                applied: state_machine.applied_index(),
                compacted: storage.snapshot_index(),
            });
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
        raft_cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let single_voter = storage.voters() == [id];
        let membership = {
            let cs = storage.initial_state()?.conf_state;
            Membership {
                voters: cs.voters,
                learners: cs.learners,
            }
        };
        let raw = RawNode::new(&raft_cfg, storage, &logger)?;
        // With peers, only what is committed is sure to be applied: an uncommitted tail may be
        // replaced by the next leader, and waiting for it could wait forever. Alone, this member
        // commits its whole log as soon as it leads, so it waits for all of it (a write may have
        // been acknowledged before the hard state recorded its commit), and for the empty entry
        // it appends as it takes leadership: it serves as the leader from its first request, so
        // leases granted then are timed by a lessor that already leads (no new-leader extension).
        let replay_target = if single_voter {
            raw.raft.raft_log.last_index() + 1
        } else {
            raw.raft.raft_log.committed
        };
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            id,
            term: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            last_index: AtomicU64::new(0),
            log_bytes_in_memory: AtomicU64::new(0),
            apply_backlog_bytes: AtomicU64::new(0),
            apply_held: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            applied: applied_tx,
            leadership: watch::channel((0, 0)).0,
            stop_notify: tokio::sync::Notify::new(),
            replay_target,
            membership: watch::channel(membership).0,
            removed: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        // flume's blocking receive parks at once. crossbeam-channel's spins and then calls
        // sched_yield (measured: 0.12 calls per put at 256 clients), which gives the core to
        // whichever thread is runnable and costs a context switch each time.
        let (tx, rx) = flume::unbounded();
        let (apply_tx, apply_rx) = flume::unbounded();
        transport.bind(PeerFeedback {
            tx: tx.clone(),
            transfers: transfers.clone(),
        });
        let apply_thread = {
            let shared = shared.clone();
            let raft_tx = tx.clone();
            let storage = raw.store().clone();
            std::thread::Builder::new()
                .name("raft-apply".into())
                .spawn(move || {
                    let _guard = StopOnExit {
                        shared: shared.clone(),
                        thread: "raft-apply",
                    };
                    apply_loop(shared, state_machine, apply_rx, raft_tx, storage)
                })
                .map_err(|e| RaftError::spawn("raft-apply", e))?
        };
        let raft_thread = {
            let shared = shared.clone();
            // Alone, there is nobody to wait for: the member takes leadership at once instead
            // of after an election timeout.
            let driver = Driver::new(raw, shared.clone(), rx, transport, apply_tx, &config)
                .campaign_at_start(single_voter);
            std::thread::Builder::new()
                .name("raft".into())
                .spawn(move || {
                    let _guard = StopOnExit {
                        shared,
                        thread: "raft",
                    };
                    // Declared after the guard, so dropped before it: the input queue is gone
                    // by the time the member reports itself stopped.
                    let mut driver = driver;
                    driver.run()
                })
                .map_err(|e| RaftError::spawn("raft", e))?
        };
        Ok(RaftNode {
            shared,
            wal_dir: Arc::new(wal_dir),
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
        self.reply(rx).await
    }

    /// Waits for the raft thread's answer, or for the member to stop: an input queued just as
    /// the raft thread died is never answered, and its reply sender stays in the queue for as
    /// long as any handle can still send.
    async fn reply<T>(&self, rx: oneshot::Receiver<Result<T, RaftError>>) -> Result<T, RaftError> {
        let stopped = self.shared.stop_notify.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        tokio::select! {
            biased;
            answer = rx => answer.map_err(|_| self.stopped_error())?,
            _ = stopped => Err(self.stopped_error()),
            // Stopped before the notification could be awaited.
            _ = std::future::ready(()), if self.is_stopped() => Err(self.stopped_error()),
        }
    }

    /// Confirms leadership with a ReadIndex round shared by every read waiting now; returns
    /// the index the state machine must reach before a linearizable read may be served.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::ReadIndex(tx))
            .map_err(|_| self.stopped_error())?;
        self.reply(rx).await
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

    /// The index `wait_replayed` waits for.
    pub fn replay_target(&self) -> u64 {
        self.shared.replay_target
    }

    /// A linearizable read barrier: ReadIndex, then wait for the apply loop to catch up.
    pub async fn linearizable_barrier(&self) -> Result<(), RaftError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await
    }

    /// Proposes a membership change (this member must lead); returns the index of its entry.
    /// Whether it was applied, the state machine tells: a change lost in a leader change
    /// never is.
    pub async fn propose_conf_change(&self, cc: eraftpb::ConfChange) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::ProposeConfChange(cc, tx))
            .map_err(|_| self.stopped_error())?;
        self.reply(rx).await
    }

    /// Asks raft to hand leadership to `to`; watch `leadership` for the outcome.
    pub fn transfer_leader(&self, to: u64) -> Result<(), RaftError> {
        self.tx
            .send(Input::TransferLeader(to))
            .map_err(|_| self.stopped_error())
    }

    /// On the leader, the highest log index known to match the leader's, per member
    /// (the leader included); None elsewhere.
    pub async fn progress(&self) -> Result<Option<std::collections::HashMap<u64, u64>>, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Progress(tx))
            .map_err(|_| self.stopped_error())?;
        rx.await.map_err(|_| self.stopped_error())
    }

    /// The membership raft works with now, and at every change.
    pub fn membership(&self) -> watch::Receiver<Membership> {
        self.shared.membership.subscribe()
    }

    /// Whether a committed change removed this member from the cluster: it must stop.
    pub fn is_removed(&self) -> bool {
        self.shared.removed.load(Ordering::Acquire)
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
            log_bytes_in_memory: self.shared.log_bytes_in_memory.load(Ordering::Acquire),
            apply_backlog_bytes: self.shared.apply_backlog_bytes.load(Ordering::Acquire),
            apply_held: self.shared.apply_held.load(Ordering::Acquire),
        }
    }

    /// Where a snapshot from the leader for raft `index` is written before it is stepped
    /// into this node (the transport's receiving side).
    pub fn received_snapshot_path(&self, index: u64) -> PathBuf {
        received_snapshot_path(&self.wal_dir, index)
    }

    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Acquire)
    }

    /// (term, leader id) now and at every change; leader 0 means none is known.
    pub fn leadership(&self) -> watch::Receiver<(u64, u64)> {
        self.shared.leadership.subscribe()
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
