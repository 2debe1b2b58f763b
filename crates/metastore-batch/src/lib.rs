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
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Why a sink refused a proposal, as the sink's own typed error: the caller downcasts it to
/// tell its causes apart (a raft node's "no leader" from a stopped node).
pub type ProposalRefused = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The proposal was refused (e.g. no leader); the sink's error is the source.
    #[error("{0}")]
    Rejected(#[source] ProposalRefused),
    /// More request bytes are queued for proposal than `max_queued_bytes` allows: the request
    /// is refused at once instead of growing the queue (etcd's `ErrTooManyRequests`).
    #[error("too many requests")]
    TooManyRequests,
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
    fn propose(&self, frame: Vec<u8>) -> BoxFuture<'static, Result<(), ProposalRefused>>;

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
    /// Most bytes of requests waiting to be taken into a batch (each counted as its encoded
    /// size plus a fixed per-request overhead). A request that would pass it is refused with
    /// `TooManyRequests`; one alone in an empty queue is always taken.
    pub max_queued_bytes: usize,
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
            max_queued_bytes: 128 * 1024 * 1024,
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

/// A request waiting for a batch: its command, what it counts against `max_queued_bytes`,
/// and where its answer goes.
struct Queued<R> {
    cmd: Command,
    cost: usize,
    reply: Reply<R>,
}

/// What a queued request costs beyond its encoded bytes (the command's allocations, its reply
/// channel, the queue node), so that a flood of tiny requests is bounded too.
pub const QUEUED_REQUEST_OVERHEAD: usize = 256;

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
    /// Bytes of requests queued and not yet taken into a batch (see `max_queued_bytes`).
    pub queued_bytes: AtomicUsize,
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
    tx: mpsc::UnboundedSender<Queued<R>>,
    completer: Completer<R>,
    stats: Arc<BatchStats>,
    timeout: Duration,
    max_queued_bytes: usize,
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
        let max_queued_bytes = config.max_queued_bytes;
        let ids = BatchIds::new(member_id);
        tokio::spawn(run(config, sink, rx, waiters.clone(), stats.clone(), ids));
        Self {
            tx,
            completer: Completer { waiters },
            stats,
            timeout,
            max_queued_bytes,
        }
    }

    /// Submits one command and waits for its applied result.
    pub async fn submit(&self, cmd: Command) -> Result<R, BatchError> {
        let len = cmd.encoded_len();
        self.submit_encoded(cmd, len).await
    }

    /// `submit` for a caller that already knows the command's encoded length.
    pub async fn submit_encoded(&self, cmd: Command, encoded_len: usize) -> Result<R, BatchError> {
        let cost = encoded_len + QUEUED_REQUEST_OVERHEAD;
        let before = self.stats.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        if before > 0 && before + cost > self.max_queued_bytes {
            self.stats.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            metrics::counter!("metastore_requests_refused_total", "reason" => "too_many_requests")
                .increment(1);
            return Err(BatchError::TooManyRequests);
        }
        let _pending = PendingGuard::new(&self.stats.pending);
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Queued { cmd, cost, reply }).is_err() {
            self.stats.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            return Err(BatchError::Stopped);
        }
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
    mut rx: mpsc::UnboundedReceiver<Queued<R>>,
    waiters: Arc<Waiters<R>>,
    stats: Arc<BatchStats>,
    mut ids: BatchIds,
) {
    let slots = Arc::new(Semaphore::new(config.max_inflight_batches.max(1)));
    let mut carry: Option<Queued<R>> = None;
    loop {
        let first = match carry.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => {
                    stats.queued_bytes.fetch_sub(c.cost, Ordering::Relaxed);
                    c
                }
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
        let mut bytes = first.cost - QUEUED_REQUEST_OVERHEAD;
        let mut commands = vec![first.cmd];
        let mut replies = vec![first.reply];
        while commands.len() < config.max_batch_count {
            match rx.try_recv() {
                Ok(next) => {
                    stats.queued_bytes.fetch_sub(next.cost, Ordering::Relaxed);
                    let len = next.cost - QUEUED_REQUEST_OVERHEAD;
                    if bytes + len > config.max_batch_bytes {
                        carry = Some(next);
                        break;
                    }
                    bytes += len;
                    commands.push(next.cmd);
                    replies.push(next.reply);
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
mod tests;
