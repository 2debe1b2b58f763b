use super::*;
use metastore_codec::{decode_batch, Op};
use metastore_proto::etcdserverpb::CompactionRequest;
use std::sync::atomic::AtomicUsize;

/// A sink that "applies" every proposal after a delay, like a raft node with an fsync.
struct EchoSink {
    completer: Mutex<Option<Completer<usize>>>,
    sizes: Mutex<Vec<usize>>,
    delay: Duration,
    proposals: AtomicUsize,
}

impl ProposalSink for Arc<EchoSink> {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        let me = self.clone();
        Box::pin(async move {
            me.proposals.fetch_add(1, Ordering::SeqCst);
            let batch = decode_batch(&frame).map_err(refused)?;
            me.sizes.lock().push(batch.commands.len());
            let completer = me
                .completer
                .lock()
                .clone()
                .ok_or_else(|| refused(std::io::Error::other("no completer")))?;
            let delay = me.delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let results = batch
                    .commands
                    .iter()
                    .map(|c| match &c.op {
                        Some(Op::Compaction(r)) => r.revision as usize,
                        _ => 0,
                    })
                    .collect();
                completer.complete(batch.id, results);
            });
            Ok(())
        })
    }
}

fn cmd(n: i64) -> Command {
    Command {
        auth: None,
        op: Some(Op::Compaction(CompactionRequest {
            revision: n,
            physical: false,
        })),
    }
}

fn setup(delay: Duration, config: BatchConfig) -> (Arc<BatchProposer<usize>>, Arc<EchoSink>) {
    let sink = Arc::new(EchoSink {
        completer: Mutex::new(None),
        sizes: Mutex::new(Vec::new()),
        delay,
        proposals: AtomicUsize::new(0),
    });
    let proposer = BatchProposer::start(config, Arc::new(sink.clone()));
    *sink.completer.lock() = Some(proposer.completer());
    (Arc::new(proposer), sink)
}

#[tokio::test]
async fn lone_request_is_proposed_alone_and_answered() {
    let (p, sink) = setup(Duration::ZERO, BatchConfig::default());
    assert_eq!(p.submit(cmd(42)).await, Ok(42));
    assert_eq!(*sink.sizes.lock(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_coalesce_and_each_gets_its_own_result() {
    let (p, sink) = setup(Duration::from_millis(5), BatchConfig::default());
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { (i, p.submit(cmd(i)).await) })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.expect("join");
        assert_eq!(r, Ok(i as usize));
    }
    let sizes = sink.sizes.lock().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 256);
    // With a slow "apply", most requests must have shared a batch.
    assert!(sizes.len() < 128, "batches: {sizes:?}");
}

#[tokio::test]
async fn batches_respect_count_cap() {
    let config = BatchConfig {
        max_batch_count: 10,
        max_inflight_batches: 1,
        ..Default::default()
    };
    let (p, sink) = setup(Duration::from_millis(2), config);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.submit(cmd(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("ok");
    }
    assert!(sink.sizes.lock().iter().all(|&n| n <= 10));
}

#[derive(Debug, thiserror::Error)]
#[error("no leader")]
struct NoLeader;

fn refused(e: impl std::error::Error + Send + Sync + 'static) -> ProposalRefused {
    Arc::new(e)
}

#[tokio::test]
async fn a_full_queue_refuses_requests_at_once_and_frees_its_bytes() {
    // Revisions 1..=9 encode to the same length.
    let one = cmd(1).encoded_len() + QUEUED_REQUEST_OVERHEAD;
    let config = BatchConfig {
        max_inflight_batches: 1,
        max_queued_bytes: 3 * one,
        request_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    // Nothing is ever applied: the first batch holds the only slot, the next request waits
    // for it outside the queue, and three more fit in the queue.
    let p: Arc<BatchProposer<usize>> = Arc::new(BatchProposer::start(config, Arc::new(BlackHole)));
    let stats = p.stats();
    let mut waiting = Vec::new();
    for i in 1..=5 {
        let p = p.clone();
        waiting.push(tokio::spawn(async move { p.submit(cmd(i)).await }));
        while stats.pending.load(Ordering::Relaxed) < i {
            tokio::task::yield_now().await;
        }
        // Let the proposer take what it can before the next one comes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 3 * one);
    for i in [8, 9] {
        let refused = tokio::time::timeout(Duration::from_secs(1), p.submit(cmd(i))).await;
        assert_eq!(refused.ok(), Some(Err(BatchError::TooManyRequests)));
    }
    // A refused request leaves no bytes behind.
    assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 3 * one);
    assert!(waiting.iter().all(|t| !t.is_finished()));
    for t in waiting {
        t.abort();
    }
}

/// Test-only equality: the variants, and a refusal's text.
impl PartialEq for BatchError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Rejected(a), Self::Rejected(b)) => a.to_string() == b.to_string(),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

struct RefusingSink;
impl ProposalSink for RefusingSink {
    fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        Box::pin(async { Err(Arc::new(NoLeader) as ProposalRefused) })
    }
}

#[tokio::test]
async fn refused_proposals_fail_their_requests() {
    let p: BatchProposer<usize> =
        BatchProposer::start(BatchConfig::default(), Arc::new(RefusingSink));
    match p.submit(cmd(1)).await {
        Err(BatchError::Rejected(e)) => assert!(e.downcast_ref::<NoLeader>().is_some()),
        other => panic!("expected the sink's refusal, got {other:?}"),
    }
}

struct BlackHole;
impl ProposalSink for BlackHole {
    fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn never_applied_requests_time_out() {
    let config = BatchConfig {
        request_timeout: Duration::from_millis(50),
        max_inflight_batches: 1,
        ..Default::default()
    };
    let p: Arc<BatchProposer<usize>> = Arc::new(BatchProposer::start(config, Arc::new(BlackHole)));
    assert_eq!(p.submit(cmd(1)).await, Err(BatchError::Timeout));
    // The lost batch's slot is reclaimed: later requests are proposed (and time out) too
    // instead of hanging forever.
    assert_eq!(p.submit(cmd(2)).await, Err(BatchError::Timeout));
}

/// A black hole that says which term each proposal belongs to.
struct TermSink(AtomicU64);
impl ProposalSink for TermSink {
    fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        Box::pin(async { Ok(()) })
    }
    fn term(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_term_that_ends_fails_its_batches_at_once_and_frees_their_slots() {
    let config = BatchConfig {
        request_timeout: Duration::from_secs(60),
        max_inflight_batches: 1,
        ..Default::default()
    };
    let sink = Arc::new(TermSink(AtomicU64::new(3)));
    let p: Arc<BatchProposer<usize>> = Arc::new(BatchProposer::start(config, sink.clone()));
    let completer = p.completer();
    let lost = {
        let p = p.clone();
        tokio::spawn(async move { p.submit(cmd(1)).await })
    };
    while completer.waiters.batches.lock().is_empty() {
        tokio::task::yield_now().await;
    }
    // Still term 3 with a leader: nothing to fail.
    completer.fail_stale(3, false);
    assert_eq!(completer.waiters.batches.lock().len(), 1);
    // Term 3 lost its leader: the batch fails now, not after 60 s.
    completer.fail_stale(3, true);
    let answer = tokio::time::timeout(Duration::from_secs(5), lost).await;
    assert_eq!(
        answer.expect("answered at once").expect("join"),
        Err(BatchError::LeaderChanged)
    );
    // Its slot is free: the next request is proposed, in the new term, and a later
    // change to term 5 fails it too.
    sink.0.store(4, Ordering::SeqCst);
    let next = {
        let p = p.clone();
        tokio::spawn(async move { p.submit(cmd(2)).await })
    };
    while completer.waiters.batches.lock().is_empty() {
        tokio::task::yield_now().await;
    }
    completer.fail_stale(5, false);
    assert_eq!(next.await.expect("join"), Err(BatchError::LeaderChanged));
}

#[test]
fn batch_ids_carry_the_member_and_count_below_it() {
    let mut ids = BatchIds::new(0xabcd_1234_5678_9ef0);
    let first = ids.next();
    assert_eq!(first >> COUNTER_BITS, 0x9ef0);
    let second = ids.next();
    assert_eq!(second >> COUNTER_BITS, 0x9ef0);
    assert_eq!((first + 1) & COUNTER_MASK, second & COUNTER_MASK);
    ids.counter = COUNTER_MASK;
    assert_eq!(
        ids.next(),
        0x9ef0 << COUNTER_BITS,
        "the counter wraps inside its bits"
    );
}

/// Keeps every proposed frame for the test to complete by hand.
#[derive(Default)]
struct Recorder(Mutex<Vec<Batch>>);
impl ProposalSink for Arc<Recorder> {
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>> {
        let me = self.clone();
        Box::pin(async move {
            me.0.lock().push(decode_batch(&frame).map_err(refused)?);
            Ok(())
        })
    }
}

async fn proposed(recorder: &Recorder, n: usize) -> Batch {
    loop {
        if let Some(b) = recorder.0.lock().get(n) {
            return b.clone();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_batch_answered_in_parts_resolves_each_part_in_order() {
    let config = BatchConfig {
        max_inflight_batches: 1,
        ..Default::default()
    };
    let recorder = Arc::new(Recorder::default());
    let p = Arc::new(BatchProposer::<usize>::start(
        config,
        Arc::new(recorder.clone()),
    ));
    let completer = p.completer();
    // A first request holds the only slot, so the next four queue up and share a batch.
    let plug = tokio::spawn({
        let p = p.clone();
        async move { p.submit(cmd(0)).await }
    });
    let first = proposed(&recorder, 0).await;
    let waiting: Vec<_> = (1..=4)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.submit(cmd(i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    completer.complete(first.id, vec![100]);
    assert_eq!(plug.await.expect("join"), Ok(100));
    let batch = proposed(&recorder, 1).await;
    assert_eq!(batch.commands.len(), 4);

    completer.complete_part(batch.id, vec![101, 102], false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let done: Vec<bool> = waiting.iter().map(|t| t.is_finished()).collect();
    assert_eq!(done, vec![true, true, false, false]);
    assert!(
        completer.is_waiting(batch.id),
        "the batch is still in flight"
    );

    completer.complete_part(batch.id, vec![103, 104], true);
    assert!(!completer.is_waiting(batch.id));
    let mut results = Vec::new();
    for t in waiting {
        results.push(t.await.expect("join"));
    }
    assert_eq!(results, vec![Ok(101), Ok(102), Ok(103), Ok(104)]);
}
