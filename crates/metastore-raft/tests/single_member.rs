//! One member end to end: proposals are persisted, committed and applied in order; reads get
//! a ReadIndex; a restart replays the WAL into a fresh state machine.

use metastore_raft::{CommittedEntry, NoPeers, RaftConfig, RaftNode, StateMachine};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<CommittedEntry>>>);

impl StateMachine for Recorder {
    fn apply(
        &mut self,
        entries: Vec<CommittedEntry>,
    ) -> Result<(), metastore_raft::StateMachineError> {
        self.0.lock().map_err(|e| e.to_string())?.extend(entries);
        Ok(())
    }
    fn applied_index(&self) -> u64 {
        0
    }
}

fn start(dir: &std::path::Path, sm: Recorder) -> RaftNode {
    RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir,
        RaftConfig::default(),
        Arc::new(NoPeers),
        Box::new(sm),
    )
    .expect("start")
}

/// `propose` resolves when the entry is in the log, not when it is committed: wait for the
/// state machine to see `n` entries.
async fn wait_for_entries(sm: &Recorder, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sm.0.lock().expect("lock").len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "entries not applied in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn payloads(sm: &Recorder) -> Vec<Vec<u8>> {
    sm.0.lock()
        .expect("lock")
        .iter()
        .map(|e| e.data.to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_apply_in_order_and_survive_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = Recorder::default();
    let node = start(dir.path(), sm.clone());

    // Sequential proposals keep their order.
    for i in 0u32..50 {
        node.propose(i.to_be_bytes().to_vec())
            .await
            .expect("propose");
    }
    wait_for_entries(&sm, 50).await;
    let idx = node.read_index().await.expect("read index");
    node.wait_applied(idx).await.expect("applied");
    let expected: Vec<Vec<u8>> = (0u32..50).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(payloads(&sm), expected);
    let status = node.status();
    assert!(status.is_leader);
    assert_eq!(status.leader_id, 1);
    assert!(status.applied_index >= idx);

    // Concurrent proposals all apply exactly once.
    let mut tasks = Vec::new();
    for t in 0u32..8 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u32..25 {
                node.propose(format!("{t}-{i}").into_bytes())
                    .await
                    .expect("propose");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    wait_for_entries(&sm, 250).await;
    node.linearizable_barrier().await.expect("barrier");
    let applied = payloads(&sm);
    assert_eq!(applied.len(), 50 + 200);
    let mut concurrent: Vec<_> = applied[50..].to_vec();
    concurrent.sort();
    concurrent.dedup();
    assert_eq!(concurrent.len(), 200);
    // Indexes strictly increase.
    let indexes: Vec<u64> = sm.0.lock().expect("lock").iter().map(|e| e.index).collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]));
    node.shutdown();
    assert!(
        node.propose(vec![1]).await.is_err(),
        "a stopped node must refuse proposals"
    );

    // Restart: a fresh state machine (applied index 0) receives the whole log again.
    let replay = Recorder::default();
    let node = start(dir.path(), replay.clone());
    node.propose(b"after-restart".to_vec())
        .await
        .expect("propose");
    wait_for_entries(&replay, 251).await;
    let mut want = applied.clone();
    want.push(b"after-restart".to_vec());
    assert_eq!(payloads(&replay), want);
    assert!(node.status().term >= 2, "a restart starts a new term");
    node.shutdown();
}

/// Reports everything applied as durable, like a state machine that snapshots each time.
#[derive(Clone, Default)]
struct DurableRecorder {
    entries: Recorder,
    durable: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine for DurableRecorder {
    fn apply(
        &mut self,
        entries: Vec<CommittedEntry>,
    ) -> Result<(), metastore_raft::StateMachineError> {
        if let Some(last) = entries.last() {
            self.durable
                .store(last.index, std::sync::atomic::Ordering::SeqCst);
        }
        self.entries.apply(entries)
    }
    fn applied_index(&self) -> u64 {
        self.durable.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn durable_index(&self) -> u64 {
        self.durable.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_state_lets_the_wal_be_purged_and_restart_resumes_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RaftConfig {
        wal_segment_size: 4096,
        ..Default::default()
    };
    // Segment files only: the WAL also keeps its next segment ready as a `.tmp` file.
    let segments = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            })
            .count()
    };
    let sm = DurableRecorder::default();
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path(),
        config.clone(),
        Arc::new(NoPeers),
        Box::new(sm.clone()),
    )
    .expect("start");
    for i in 0u32..400 {
        node.propose(vec![7; 100].into_iter().chain(i.to_be_bytes()).collect())
            .await
            .expect("propose");
    }
    wait_for_entries(&sm.entries, 400).await;
    // Compaction runs on the raft thread after the apply loop reports durability.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while segments(dir.path()) > 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "WAL never purged: {} segments",
            segments(dir.path())
        );
        node.propose(vec![1]).await.expect("propose");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let durable = sm.durable.load(std::sync::atomic::Ordering::SeqCst);
    node.shutdown();

    // A state machine that already holds everything up to `durable` gets only what follows.
    let restarted = DurableRecorder::default();
    restarted
        .durable
        .store(durable, std::sync::atomic::Ordering::SeqCst);
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path(),
        config,
        Arc::new(NoPeers),
        Box::new(restarted.clone()),
    )
    .expect("restart after purge");
    node.propose(b"after".to_vec()).await.expect("propose");
    wait_for_entries(&restarted.entries, 1).await;
    let got = restarted.entries.0.lock().expect("lock").clone();
    assert!(
        got.iter().all(|e| e.index > durable),
        "entries at or below the durable index were replayed"
    );
    assert_eq!(got.last().map(|e| e.data.to_vec()), Some(b"after".to_vec()));
    assert!(node.status().is_leader);
    node.shutdown();
}

/// A member alone in its configuration has no follower to keep entries for: once applied,
/// its in-memory log is trimmed (in steps of 1,000 entries) instead of holding the last
/// 10,000 entries or 256 MiB, which a million keys loaded in txns of 100 filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_member_keeps_no_catch_up_log_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = Recorder::default();
    let node = start(dir.path(), sm.clone());
    let entries = 3_000u32;
    let payload = 1024;
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..entries).step_by(8) {
                let mut data = vec![0u8; payload];
                data[..4].copy_from_slice(&i.to_be_bytes());
                node.propose(data).await.expect("propose");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    wait_for_entries(&sm, entries as usize).await;
    let written = u64::from(entries) * payload as u64;
    // The trim runs as the driver handles its next input or tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut held = node.status().log_bytes_in_memory;
    while held > written / 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        held = node.status().log_bytes_in_memory;
    }
    assert!(
        held <= written / 2,
        "{held} bytes of log still in memory after {written} bytes were written and applied"
    );
    node.shutdown();
}

/// A state machine slower than the log it is fed.
struct SlowRecorder(Recorder);

impl StateMachine for SlowRecorder {
    fn apply(
        &mut self,
        entries: Vec<CommittedEntry>,
    ) -> Result<(), metastore_raft::StateMachineError> {
        std::thread::sleep(std::time::Duration::from_millis(10));
        self.0.apply(entries)
    }
    fn applied_index(&self) -> u64 {
        0
    }
}

/// At a restart the whole log is committed at once: the raft thread used to hand all of it to
/// the apply thread's queue (a 10M-key log held twice in memory). Now it takes no Ready while
/// the queue holds `max_apply_backlog_bytes`, and the replay still completes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_a_slow_state_machine_queues_a_bounded_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = 64u32;
    let payload = 256 * 1024;
    {
        let sm = Recorder::default();
        let node = start(dir.path(), sm.clone());
        for i in 0..entries {
            let mut data = vec![0u8; payload];
            data[..4].copy_from_slice(&i.to_be_bytes());
            node.propose(data).await.expect("propose");
        }
        wait_for_entries(&sm, entries as usize).await;
        node.shutdown();
    }
    let bound = 1024 * 1024u64;
    let config = RaftConfig {
        max_apply_backlog_bytes: bound,
        max_committed_size_per_ready: bound,
        ..RaftConfig::default()
    };
    let sm = Recorder::default();
    let node = RaftNode::start(
        1,
        metastore_raft::Bootstrap::voters(&[1]),
        dir.path(),
        config,
        Arc::new(NoPeers),
        Box::new(SlowRecorder(sm.clone())),
    )
    .expect("restart");
    let (mut most, mut held) = (0u64, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sm.0.lock().expect("lock").len() < entries as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "replay not done in time"
        );
        let status = node.status();
        most = most.max(status.apply_backlog_bytes);
        held |= status.apply_held;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // One Ready past the bound, and the entries committed by persisting it (its light ready).
    let slack = 2 * bound + 4 * 64;
    assert!(
        most <= bound + slack,
        "{most} bytes queued for the apply thread; bound {bound} (+{slack} for one Ready)"
    );
    assert!(held, "the raft thread never waited for the apply thread");
    let replayed = payloads(&sm);
    assert_eq!(replayed.len(), entries as usize);
    for (i, data) in replayed.iter().enumerate() {
        assert_eq!(
            data[..4],
            (i as u32).to_be_bytes(),
            "entry {i} out of order"
        );
    }
    node.shutdown();
}

/// `apply_held` is what admission control reads ("etcdserver: too many requests"): under a
/// backlog far below its bound it must never be seen set. It once was, for an instant in each
/// Ready, and a put in ~50,000 was refused under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_apply_backlog_never_shows_the_member_as_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = Recorder::default();
    let node = start(dir.path(), sm.clone());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (node, done) = (node.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if node.status().apply_held {
                    seen += 1;
                }
            }
            seen
        })
    };
    let entries = 20_000u32;
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..entries).step_by(16) {
                node.propose(i.to_be_bytes().to_vec())
                    .await
                    .expect("propose");
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    wait_for_entries(&sm, entries as usize).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    assert_eq!(
        seen, 0,
        "apply_held seen set {seen} times with a backlog of a few KiB"
    );
    node.shutdown();
}
