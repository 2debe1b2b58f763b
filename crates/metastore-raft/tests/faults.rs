//! Faults the raft node must survive or report: a panicking apply or raft thread stops the
//! member (so the server exits for its supervisor), a slow snapshot does not stall WAL purging
//! for good, and a ReadIndex that raft-rs dropped is sent again.

use metastore_raft::eraftpb::{Message, MessageType};
use metastore_raft::{CommittedEntry, NoPeers, RaftConfig, RaftNode, StateMachine, Transport};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct PanicOnApply;

impl StateMachine for PanicOnApply {
    fn apply(&mut self, _: Vec<CommittedEntry>) -> Result<(), metastore_raft::StateMachineError> {
        panic!("injected apply panic");
    }
    fn applied_index(&self) -> u64 {
        0
    }
}

/// Starts a lone member on `sm`, proposes one entry, and returns the error the member stopped
/// with once it reports itself stopped (by itself: no further proposal wakes it).
async fn stopped_after_one_entry(sm: Box<dyn StateMachine>) -> metastore_raft::RaftError {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path(),
        RaftConfig::default(),
        Arc::new(NoPeers),
        sm,
    )
    .expect("start");
    node.propose(b"x".to_vec()).await.expect("propose");
    wait_until(
        "the member reports itself stopped",
        Duration::from_secs(5),
        || node.is_stopped(),
    )
    .await;
    let err = node.wait_applied(u64::MAX).await.expect_err("stopped");
    node.shutdown();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_apply_thread_stops_the_member() {
    let err = stopped_after_one_entry(Box::new(PanicOnApply)).await;
    assert!(
        matches!(err, metastore_raft::RaftError::ThreadPanicked("raft-apply")),
        "{err}"
    );
}

/// A state machine whose disk went away: its error, not a panic.
struct FailOnApply;

impl StateMachine for FailOnApply {
    fn apply(&mut self, _: Vec<CommittedEntry>) -> Result<(), metastore_raft::StateMachineError> {
        Err(Box::new(std::io::Error::other("injected disk failure")))
    }
    fn applied_index(&self) -> u64 {
        0
    }
}

/// The member stops with the state machine's own error, which callers can inspect by type
/// (it used to travel as a string).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_state_machine_stops_the_member_with_its_error() {
    let err = stopped_after_one_entry(Box::new(FailOnApply)).await;
    let metastore_raft::RaftError::StateMachine(source) = &err else {
        panic!("expected the state machine's error, got {err:?}");
    };
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("the io::Error the state machine returned");
    assert_eq!(io.to_string(), "injected disk failure");
}

/// A transport whose first send panics, on the raft thread.
struct PanickingTransport;

impl Transport for PanickingTransport {
    fn send(&self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            panic!("injected transport panic");
        }
    }
}

struct Nothing;

impl StateMachine for Nothing {
    fn apply(&mut self, _: Vec<CommittedEntry>) -> Result<(), metastore_raft::StateMachineError> {
        Ok(())
    }
    fn applied_index(&self) -> u64 {
        0
    }
}

fn fast() -> RaftConfig {
    RaftConfig {
        tick_interval: Duration::from_millis(20),
        wal_sync: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_raft_thread_stops_the_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two voters: after an election timeout member 1 sends a (pre)vote, and the send panics.
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1, 2]),
        dir.path(),
        fast(),
        Arc::new(PanickingTransport),
        Box::new(Nothing),
    )
    .expect("start");
    wait_until(
        "the member reports itself stopped",
        Duration::from_secs(10),
        || node.is_stopped(),
    )
    .await;
    let err = node.propose(b"x".to_vec()).await.expect_err("stopped");
    assert!(
        matches!(err, metastore_raft::RaftError::ThreadPanicked("raft")),
        "{err}"
    );
    node.shutdown();
}

/// Reports its state durable like a slow snapshot: the index captured at one point becomes
/// durable only 11,500 entries later, after the raft thread has trimmed its in-memory log past
/// it (it keeps the last 10,000 applied entries).
#[derive(Clone, Default)]
struct SlowSnapshots {
    applied: Arc<AtomicU64>,
    capturing: Arc<AtomicU64>,
    durable: Arc<AtomicU64>,
}

const SNAPSHOT_EVERY: u64 = 5_000;
const SNAPSHOT_TAKES: u64 = 11_500;

impl StateMachine for SlowSnapshots {
    fn apply(
        &mut self,
        entries: Vec<CommittedEntry>,
    ) -> Result<(), metastore_raft::StateMachineError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        self.applied.store(last, Ordering::SeqCst);
        let capturing = self.capturing.load(Ordering::SeqCst);
        if capturing == 0 {
            if last >= self.durable.load(Ordering::SeqCst) + SNAPSHOT_EVERY {
                self.capturing.store(last, Ordering::SeqCst);
            }
        } else if last >= capturing + SNAPSHOT_TAKES {
            self.durable.store(capturing, Ordering::SeqCst);
            self.capturing.store(0, Ordering::SeqCst);
        }
        Ok(())
    }
    fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }
    fn durable_index(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }
}

fn segment_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_slower_than_the_in_memory_log_still_lets_the_wal_be_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RaftConfig {
        wal_segment_size: 64 * 1024,
        ..fast()
    };
    let sm = SlowSnapshots::default();
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path(),
        config,
        Arc::new(NoPeers),
        Box::new(sm.clone()),
    )
    .expect("start");
    let first_segment = segment_names(dir.path())
        .first()
        .cloned()
        .expect("a segment");
    let total: u64 = 40_000;
    let mut proposed = 0;
    while proposed < total {
        let wave: Vec<_> = (0..500)
            .map(|i| {
                let node = node.clone();
                let payload = (proposed + i).to_be_bytes().to_vec();
                tokio::spawn(async move { node.propose(payload).await })
            })
            .collect();
        for p in wave {
            p.await.expect("join").expect("propose");
        }
        proposed += 500;
    }
    wait_until("every entry applied", Duration::from_secs(30), || {
        sm.applied.load(Ordering::SeqCst) >= total
    })
    .await;
    // Several slow snapshots completed, each below the trimmed in-memory log...
    assert!(sm.durable.load(Ordering::SeqCst) >= 2 * SNAPSHOT_EVERY);
    // ...and each one purged the WAL below it: the first segment is gone.
    wait_until(
        "the first WAL segment purged",
        Duration::from_secs(10),
        || !segment_names(dir.path()).contains(&first_segment),
    )
    .await;
    node.shutdown();
}

/// An in-process network: every message goes straight to the addressed node's `step`, except
/// the ones `drop` picks.
#[derive(Default)]
struct LocalNet {
    nodes: Mutex<HashMap<u64, RaftNode>>,
    dropped_read_indexes: AtomicU64,
    drop_next_read_index: AtomicBool,
}

struct LocalTransport(Arc<LocalNet>);

impl Transport for LocalTransport {
    fn send(&self, msgs: Vec<Message>) {
        let nodes = self.0.nodes.lock().expect("lock");
        for msg in msgs {
            if msg.get_msg_type() == MessageType::MsgReadIndex
                && self.0.drop_next_read_index.swap(false, Ordering::SeqCst)
            {
                self.0.dropped_read_indexes.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if let Some(node) = nodes.get(&msg.to) {
                let _ = node.step(msg);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_index_lost_on_the_way_to_the_leader_is_sent_again() {
    let net = Arc::new(LocalNet::default());
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    for (i, dir) in dirs.iter().enumerate() {
        let id = i as u64 + 1;
        let node = RaftNode::start(
            id,
            metastore_raft::Bootstrap::voters(&[1, 2, 3]),
            dir.path(),
            fast(),
            Arc::new(LocalTransport(net.clone())),
            Box::new(Nothing),
        )
        .expect("start");
        net.nodes.lock().expect("lock").insert(id, node);
    }
    let node = |id: u64| net.nodes.lock().expect("lock")[&id].clone();
    wait_until("a leader", Duration::from_secs(10), || {
        (1..=3).any(|id| node(id).status().is_leader)
    })
    .await;
    let leader = (1..=3)
        .find(|&id| node(id).status().is_leader)
        .expect("leader");
    // The leader must have committed in its term before it answers ReadIndex.
    node(leader)
        .linearizable_barrier()
        .await
        .expect("leader read");
    let follower = node(if leader == 1 { 2 } else { 1 });
    wait_until(
        "the follower knows the leader",
        Duration::from_secs(5),
        || follower.status().leader_id == leader,
    )
    .await;
    net.drop_next_read_index.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), follower.linearizable_barrier()).await;
    assert_eq!(net.dropped_read_indexes.load(Ordering::SeqCst), 1);
    read.expect("the follower read must be retried, not wait forever")
        .expect("read index");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered by the retry"
    );
    for id in 1..=3 {
        node(id).shutdown();
    }
}
