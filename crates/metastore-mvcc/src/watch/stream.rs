//! One watch stream's queue from the hub to the client's connection, bounded by bytes.
//!
//! Event messages are refused once the queue holds `limit` bytes (the hub then moves the
//! watcher to catch-up, so it reads its events back from history later instead of growing
//! the queue); a message into an empty queue is always taken, whatever its size. Control
//! messages (created, canceled, progress) are never refused but are counted: the side that
//! reads the client's requests waits for room (`StreamRoom::wait`) before taking the next
//! one, so a client that sends requests without reading the answers stops being read.

use metastore_proto::etcdserverpb::WatchResponse;
use prost::Message as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

/// Limits of every watch stream.
#[derive(Clone, Copy, Debug)]
pub struct WatchLimits {
    /// Bytes of responses queued for one stream before its watchers drop to catch-up and its
    /// requests stop being read.
    pub stream_queue_bytes: usize,
    /// Most watchers on one stream; more are refused (created and canceled at once).
    pub watchers_per_stream: usize,
    /// Bytes of responses queued for all streams together: past it, event messages are
    /// refused on every stream that already holds one (its watchers catch up later), so many
    /// slow streams cannot add up to more than this.
    pub total_queue_bytes: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            stream_queue_bytes: 8 * 1024 * 1024,
            watchers_per_stream: 100_000,
            total_queue_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What every stream's queue holds together, and how much that may be.
#[derive(Debug)]
pub(super) struct TotalQueued {
    queued: AtomicUsize,
    limit: usize,
}

impl TotalQueued {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            queued: AtomicUsize::new(0),
            limit,
        })
    }

    pub(super) fn bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Bytes more that all streams together may take.
    pub(super) fn room(&self) -> usize {
        self.limit.saturating_sub(self.bytes())
    }
}

/// What the queue holds and how much it may hold; shared by both ends.
struct Room {
    queued: AtomicUsize,
    limit: usize,
    freed: Notify,
    total: Arc<TotalQueued>,
}

impl Room {
    fn take(&self, cost: usize) {
        self.queued.fetch_add(cost, Ordering::AcqRel);
        self.total.queued.fetch_add(cost, Ordering::AcqRel);
    }

    fn release(&self, cost: usize) {
        self.total.queued.fetch_sub(cost, Ordering::AcqRel);
        let before = self.queued.fetch_sub(cost, Ordering::AcqRel);
        if before >= self.limit {
            self.freed.notify_waiters();
        }
    }
}

/// The receiving end of a watch stream.
pub struct StreamReceiver {
    rx: mpsc::UnboundedReceiver<(WatchResponse, usize)>,
    room: Arc<Room>,
}

/// A received message's place in its stream's queue: the bytes stay counted until this is
/// dropped, so a message still on its way to the connection counts against the limits.
pub struct QueueSlot {
    room: Arc<Room>,
    cost: usize,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.room.release(self.cost);
    }
}

impl StreamReceiver {
    /// The next message, with its slot in the queue (drop it once the message is handed to
    /// the connection).
    pub async fn recv(&mut self) -> Option<(WatchResponse, QueueSlot)> {
        let (msg, cost) = self.rx.recv().await?;
        let slot = QueueSlot {
            room: self.room.clone(),
            cost,
        };
        Some((msg, slot))
    }

    /// A handle that waits until the stream's queue is below its limit.
    pub fn room(&self) -> StreamRoom {
        StreamRoom(self.room.clone())
    }

    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<WatchResponse> {
        let (msg, cost) = self.rx.try_recv().ok()?;
        self.room.release(cost);
        Some(msg)
    }
}

/// Waits for room in a stream's queue (see the module doc).
#[derive(Clone)]
pub struct StreamRoom(Arc<Room>);

impl StreamRoom {
    pub async fn wait(&self) {
        loop {
            let freed = self.0.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.0.queued.load(Ordering::Acquire) < self.0.limit {
                return;
            }
            freed.await;
        }
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.0.queued.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub(super) struct StreamSink {
    tx: mpsc::UnboundedSender<(WatchResponse, usize)>,
    room: Arc<Room>,
}

pub(super) enum Delivery {
    Sent,
    Full,
    Closed,
}

pub(super) fn stream_queue(limit: usize, total: Arc<TotalQueued>) -> (StreamSink, StreamReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Room {
        queued: AtomicUsize::new(0),
        limit,
        freed: Notify::new(),
        total,
    });
    (
        StreamSink {
            tx,
            room: room.clone(),
        },
        StreamReceiver { rx, room },
    )
}

impl StreamSink {
    /// Queues a control message: never refused, but counted against the limit.
    pub(super) fn control(&self, msg: WatchResponse) {
        let cost = msg.encoded_len();
        self.room.take(cost);
        if self.tx.send((msg, cost)).is_err() {
            self.room.release(cost);
        }
    }

    /// Queues an event message unless the queue is full.
    pub(super) fn events(&self, msg: WatchResponse) -> Delivery {
        if self.tx.is_closed() {
            return Delivery::Closed;
        }
        let cost = msg.encoded_len();
        let queued = self.room.queued.load(Ordering::Acquire);
        let total = self.room.total.bytes();
        if queued > 0 && (queued + cost > self.room.limit || total + cost > self.room.total.limit) {
            return Delivery::Full;
        }
        self.room.take(cost);
        match self.tx.send((msg, cost)) {
            Ok(()) => Delivery::Sent,
            Err(_) => {
                self.room.release(cost);
                Delivery::Closed
            }
        }
    }

    /// Bytes of event messages this stream can take now: the least of its own room and
    /// everyone's; a stream holding nothing takes one message of any size.
    pub(super) fn room_bytes(&self) -> usize {
        let queued = self.room.queued.load(Ordering::Acquire);
        if queued == 0 {
            return usize::MAX;
        }
        let own = self.room.limit.saturating_sub(queued);
        let everyone = self
            .room
            .total
            .limit
            .saturating_sub(self.room.total.bytes());
        own.min(everyone)
    }
}
