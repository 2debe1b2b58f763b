//! The batch proposer.
//!
//! Requests submit [`Command`]s; one task turns whatever is queued into a [`Batch`] (bounded by
//! count and bytes), encodes it as one frame and hands it to a [`ProposalSink`] (the raft node).
//! There is no timer: a lone request is proposed at once. Batches grow by themselves under load
//! because at most `max_inflight_batches` batches are proposed-but-not-applied at a time, and
//! everything that arrives meanwhile joins the next batch.
//!
//! The apply side reports each batch's per-command results through a [`Completer`], which
//! resolves the waiting requests and frees the in-flight slot.

use futures::future::BoxFuture;
use metastore_codec::{encode_batch, Batch, CodecOptions, Command};
use parking_lot::Mutex;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The proposal was refused (e.g. no leader); the message comes from the sink.
    #[error("{0}")]
    Rejected(String),
    #[error("request timed out")]
    Timeout,
    #[error("batch proposer stopped")]
    Stopped,
    /// The term the batch was proposed in ended before it was applied: it may or may not
    /// still be committed by the next leader (etcd's `ErrLeaderChanged`).
    #[error("leader changed")]
    LeaderChanged,
}

/// Where encoded batches go: the raft node.
pub trait ProposalSink: Send + Sync + 'static {
    /// Proposes one frame. Resolves once it is in the log (not when committed).
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>>;

    /// The raft term a proposal made now belongs to, so that its waiters can be failed at
    /// once when that term ends (`Completer::fail_stale`). 0 for sinks without terms.
    fn term(&self) -> u64 {
        0
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct BatchConfig {
    /// Most commands in one batch.
    pub max_batch_count: usize,
    /// Most encoded bytes in one batch (a single larger command still goes alone).
    pub max_batch_bytes: usize,
    /// Batches proposed but not yet applied; more arrivals wait and join the next batch.
    pub max_inflight_batches: usize,
    /// Commands of a batch applied (and visible to readers) before their requests are answered,
    /// while the rest of the batch is still being applied. Over an engine that persists writes
    /// on its own (RocksDB) a batch is always answered whole.
    pub apply_part_len: usize,
    /// How long a request waits for its result before it is answered with a timeout.
    #[serde(with = "millis")]
    pub request_timeout: Duration,
    pub codec: CodecOptions,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_count: 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_inflight_batches: 2,
            apply_part_len: 32,
            request_timeout: Duration::from_secs(7),
            codec: CodecOptions::default(),
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

type Reply<R> = oneshot::Sender<Result<R, BatchError>>;

struct InFlight<R> {
    replies: Vec<Reply<R>>,
    _permit: OwnedSemaphorePermit,
    proposed_at: Instant,
    term: u64,
}

struct Waiters<R> {
    batches: Mutex<HashMap<u64, InFlight<R>>>,
}

/// Resolves the requests of applied batches. Cheap to clone; used by the apply loop.
pub struct Completer<R> {
    waiters: Arc<Waiters<R>>,
}

impl<R> Clone for Completer<R> {
    fn clone(&self) -> Self {
        Self {
            waiters: self.waiters.clone(),
        }
    }
}

impl<R> Completer<R> {
    /// Delivers the results of batch `id`, one per command in order. Batches proposed by
    /// another member (or before a restart) have no waiters here and are ignored.
    pub fn complete(&self, id: u64, results: Vec<R>) {
        self.complete_part(id, results, true);
    }

    /// Delivers the next results of batch `id`, in command order, continuing where the
    /// previous part stopped. `last` marks the final part: the batch then stops being in
    /// flight and frees its slot.
    pub fn complete_part(&self, id: u64, results: Vec<R>, last: bool) {
        let mut batches = self.waiters.batches.lock();
        let replies = if last {
            match batches.remove(&id) {
                Some(inflight) => inflight.replies,
                None => return,
            }
        } else {
            match batches.get_mut(&id) {
                Some(inflight) => {
                    let rest = inflight
                        .replies
                        .split_off(results.len().min(inflight.replies.len()));
                    std::mem::replace(&mut inflight.replies, rest)
                }
                None => return,
            }
        };
        // Answered outside the lock: waking a request's task must not hold up the proposer.
        drop(batches);
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(Ok(result));
        }
    }

    /// Answers `etcdserver: leader changed` to every batch proposed in a term before
    /// `term` (and in `term` itself when it has no leader any more), and frees their slots,
    /// instead of leaving them to the request timeout: writes resume as soon as a new leader
    /// is there.
    pub fn fail_stale(&self, term: u64, leaderless: bool) {
        let mut batches = self.waiters.batches.lock();
        let stale: Vec<u64> = batches
            .iter()
            .filter(|(_, b)| b.term < term || (leaderless && b.term == term))
            .map(|(id, _)| *id)
            .collect();
        let failed: Vec<InFlight<R>> = stale.iter().filter_map(|id| batches.remove(id)).collect();
        drop(batches);
        for batch in failed {
            for reply in batch.replies {
                let _ = reply.send(Err(BatchError::LeaderChanged));
            }
        }
    }

    /// Whether a batch id is waited for on this member.
    pub fn is_waiting(&self, id: u64) -> bool {
        self.waiters.batches.lock().contains_key(&id)
    }
}

/// Counters for metrics and benchmarks.
#[derive(Default)]
pub struct BatchStats {
    pub batches: AtomicU64,
    pub commands: AtomicU64,
    /// Requests submitted and not answered yet (etcd's `proposals_pending`).
    pub pending: AtomicI64,
}

/// Counts a request as pending for as long as it lives.
struct PendingGuard<'a>(&'a AtomicI64);

impl<'a> PendingGuard<'a> {
    fn new(pending: &'a AtomicI64) -> Self {
        pending.fetch_add(1, Ordering::Relaxed);
        Self(pending)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct BatchProposer<R> {
    tx: mpsc::UnboundedSender<(Command, Reply<R>)>,
    completer: Completer<R>,
    stats: Arc<BatchStats>,
    timeout: Duration,
}

impl<R: Send + 'static> BatchProposer<R> {
    /// Starts the proposer task on the current tokio runtime.
    pub fn start(config: BatchConfig, sink: Arc<dyn ProposalSink>) -> Self {
        Self::start_on_member(config, sink, 0)
    }

    /// Like `start`, with batch ids that carry 16 bits of `member_id` above a 48-bit counter
    /// (as etcd's request ids): members applying each other's batches never mistake another
    /// member's batch for one of their own.
    pub fn start_on_member(
        config: BatchConfig,
        sink: Arc<dyn ProposalSink>,
        member_id: u64,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiters = Arc::new(Waiters {
            batches: Mutex::new(HashMap::new()),
        });
        let stats = Arc::new(BatchStats::default());
        let timeout = config.request_timeout;
        let ids = BatchIds::new(member_id);
        tokio::spawn(run(config, sink, rx, waiters.clone(), stats.clone(), ids));
        Self {
            tx,
            completer: Completer { waiters },
            stats,
            timeout,
        }
    }

    /// Submits one command and waits for its applied result.
    pub async fn submit(&self, cmd: Command) -> Result<R, BatchError> {
        let _pending = PendingGuard::new(&self.stats.pending);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .map_err(|_| BatchError::Stopped)?;
        let result = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BatchError::Stopped),
            Err(_) => Err(BatchError::Timeout),
        };
        if result.is_err() {
            // A request the state machine answered with an error (a failed txn compare, a
            // missing lease) is an applied proposal; only one that never applied fails.
            metrics::counter!("etcd_server_proposals_failed_total").increment(1);
        }
        result
    }

    pub fn completer(&self) -> Completer<R> {
        self.completer.clone()
    }

    pub fn stats(&self) -> Arc<BatchStats> {
        self.stats.clone()
    }
}

async fn run<R: Send + 'static>(
    config: BatchConfig,
    sink: Arc<dyn ProposalSink>,
    mut rx: mpsc::UnboundedReceiver<(Command, Reply<R>)>,
    waiters: Arc<Waiters<R>>,
    stats: Arc<BatchStats>,
    mut ids: BatchIds,
) {
    let slots = Arc::new(Semaphore::new(config.max_inflight_batches.max(1)));
    let mut carry: Option<(Command, Reply<R>)> = None;
    loop {
        let first = match carry.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        // Wait for an in-flight slot; while waiting, more requests queue up and join this batch.
        // Poll at most every second so a batch lost in a leader change frees its slot soon after
        // it has timed out, instead of one more full timeout later.
        let poll = config.request_timeout.min(Duration::from_secs(1));
        let permit = loop {
            match tokio::time::timeout(poll, slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => break p,
                Ok(Err(_)) => return,
                Err(_) => expire(&waiters, config.request_timeout),
            }
        };
        let mut bytes = first.0.encoded_len();
        let mut commands = vec![first.0];
        let mut replies = vec![first.1];
        while commands.len() < config.max_batch_count {
            match rx.try_recv() {
                Ok((cmd, reply)) => {
                    let len = cmd.encoded_len();
                    if bytes + len > config.max_batch_bytes {
                        carry = Some((cmd, reply));
                        break;
                    }
                    bytes += len;
                    commands.push(cmd);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let id = ids.next();
        metrics::histogram!("metastore_raft_proposal_batch_size").record(commands.len() as f64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .commands
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        let frame = encode_batch(&Batch { id, commands }, &config.codec).to_vec();
        waiters.batches.lock().insert(
            id,
            InFlight {
                replies,
                _permit: permit,
                proposed_at: Instant::now(),
                term: sink.term(),
            },
        );
        if let Err(reason) = sink.propose(frame).await {
            if let Some(inflight) = waiters.batches.lock().remove(&id) {
                for reply in inflight.replies {
                    let _ = reply.send(Err(BatchError::Rejected(reason.clone())));
                }
            }
        }
    }
}

/// Batch ids: the member's 16 bits above a 48-bit counter that starts at a random point, so
/// that ids do not repeat those of batches a previous run left in the log.
struct BatchIds {
    prefix: u64,
    counter: u64,
}

const COUNTER_BITS: u32 = 48;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

impl BatchIds {
    fn new(member_id: u64) -> Self {
        Self {
            prefix: (member_id & 0xffff) << COUNTER_BITS,
            counter: rand::random::<u64>() & COUNTER_MASK,
        }
    }

    fn next(&mut self) -> u64 {
        self.counter = (self.counter + 1) & COUNTER_MASK;
        self.prefix | self.counter
    }
}

/// Drops batches that were never applied (e.g. lost in a leader change), answering their
/// requests with a timeout and freeing their slots.
fn expire<R>(waiters: &Waiters<R>, older_than: Duration) {
    let mut batches = waiters.batches.lock();
    let stale: Vec<u64> = batches
        .iter()
        .filter(|(_, b)| b.proposed_at.elapsed() >= older_than)
        .map(|(id, _)| *id)
        .collect();
    for id in stale {
        if let Some(b) = batches.remove(&id) {
            tracing::warn!(batch = id, "batch never applied; timing out its requests");
            for reply in b.replies {
                let _ = reply.send(Err(BatchError::Timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
        fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
            let me = self.clone();
            Box::pin(async move {
                me.proposals.fetch_add(1, Ordering::SeqCst);
                let batch = decode_batch(&frame).map_err(|e| e.to_string())?;
                me.sizes.lock().push(batch.commands.len());
                let completer = me.completer.lock().clone().ok_or("no completer")?;
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

    struct RefusingSink;
    impl ProposalSink for RefusingSink {
        fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(async { Err("no leader".to_string()) })
        }
    }

    #[tokio::test]
    async fn refused_proposals_fail_their_requests() {
        let p: BatchProposer<usize> =
            BatchProposer::start(BatchConfig::default(), Arc::new(RefusingSink));
        assert_eq!(
            p.submit(cmd(1)).await,
            Err(BatchError::Rejected("no leader".into()))
        );
    }

    struct BlackHole;
    impl ProposalSink for BlackHole {
        fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
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
        let p: Arc<BatchProposer<usize>> =
            Arc::new(BatchProposer::start(config, Arc::new(BlackHole)));
        assert_eq!(p.submit(cmd(1)).await, Err(BatchError::Timeout));
        // The lost batch's slot is reclaimed: later requests are proposed (and time out) too
        // instead of hanging forever.
        assert_eq!(p.submit(cmd(2)).await, Err(BatchError::Timeout));
    }

    /// A black hole that says which term each proposal belongs to.
    struct TermSink(AtomicU64);
    impl ProposalSink for TermSink {
        fn propose(&self, _frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
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
        fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
            let me = self.clone();
            Box::pin(async move {
                me.0.lock()
                    .push(decode_batch(&frame).map_err(|e| e.to_string())?);
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
}
