//! The watch hub: delivers the store's events to watchers, in revision order, each exactly once.
//!
//! As in etcd, watchers are *synced* (caught up: the apply loop hands them events as revisions
//! are applied) or *unsynced* (behind: a catch-up loop reads their events back from the store's
//! history). A watcher whose stream is full is never waited for: it drops to unsynced and
//! catches up later, so slow watchers neither block writes nor grow memory without bound.
//!
//! All messages of one stream (created, events, progress, canceled) travel in one channel, in
//! the order the hub decided them under its lock, bounded by bytes (`stream.rs`).

use crate::keyindex::KeyRange;
use bytes::Bytes;
use metastore_proto::etcdserverpb::{ResponseHeader, WatchResponse};
use metastore_proto::mvccpb::{event::EventType, Event};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod catch_up;
mod index;
mod stream;
use index::SyncedIndex;
use stream::{stream_queue, Delivery, StreamSink, TotalQueued};
pub use stream::{QueueSlot, StreamReceiver, StreamRoom, WatchLimits};

/// The watch id etcd uses for responses not tied to one watcher.
pub const INVALID_WATCH_ID: i64 = -1;

pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const ERR_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// What a watcher asked for.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// 0 lets the stream choose the next free id.
    pub watch_id: i64,
    pub key: Bytes,
    /// etcd's encoding: empty = this key only, `[0]` = every key >= `key`.
    pub range_end: Bytes,
    /// 0 = from the next revision.
    pub start_revision: i64,
    pub prev_kv: bool,
    pub filter_put: bool,
    pub filter_delete: bool,
}

#[derive(Clone)]
struct Watcher {
    stream: u64,
    watch_id: i64,
    spec: WatchSpec,
    /// Next revision this watcher must receive.
    next_rev: i64,
    synced: bool,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match KeyRange::new(&self.spec.key, &self.spec.range_end) {
            KeyRange::Single(k) => k == key,
            KeyRange::Span(lo, hi) => {
                use std::ops::Bound;
                let above = match lo {
                    Bound::Included(l) => key >= l,
                    Bound::Excluded(l) => key > l,
                    Bound::Unbounded => true,
                };
                let below = match hi {
                    Bound::Included(h) => key <= h,
                    Bound::Excluded(h) => key < h,
                    Bound::Unbounded => true,
                };
                above && below
            }
            KeyRange::Empty => false,
        }
    }

    fn wants(&self, ev: &Event) -> bool {
        let put = ev.r#type == EventType::Put as i32;
        if (put && self.spec.filter_put) || (!put && self.spec.filter_delete) {
            return false;
        }
        ev.kv
            .as_ref()
            .is_some_and(|kv| kv.mod_revision >= self.next_rev && self.matches(&kv.key))
    }

    fn shape(&self, ev: &Event) -> Event {
        let mut ev = ev.clone();
        if !self.spec.prev_kv {
            ev.prev_kv = None;
        }
        ev
    }
}

struct Stream {
    sink: StreamSink,
    next_auto_id: i64,
    ids: HashMap<i64, u64>,
    /// A RequestProgress waits until every watcher of the stream is caught up, so that it never
    /// reports a revision older than events already sent (etcd 3.5.8+ defers it the same way).
    progress_pending: bool,
}

impl Stream {
    fn all_synced(&self, watchers: &HashMap<u64, Watcher>) -> bool {
        self.ids
            .values()
            .all(|h| watchers.get(h).is_none_or(|w| w.synced))
    }
}

/// Most revisions one catch-up round reads, as etcd syncs unsynced watchers in bounded steps.
const MAX_REVISIONS_PER_ROUND: i64 = 1000;

#[derive(Default)]
struct Inner {
    next_handle: u64,
    next_stream: u64,
    streams: HashMap<u64, Stream>,
    watchers: HashMap<u64, Watcher>,
    /// Synced watchers, found by the keys they watch.
    synced: SyncedIndex,
    unsynced: HashSet<u64>,
    /// Every revision up to this one has been handed to synced watchers.
    dispatched_rev: i64,
    limits: WatchLimits,
    /// Shared by the streams opened under the current limits.
    total_queued: Option<Arc<TotalQueued>>,
}

impl Inner {
    fn index(&mut self, handle: u64) {
        if let Some(w) = self.watchers.get(&handle) {
            self.synced.insert(handle, &w.spec);
        }
    }

    fn unindex(&mut self, handle: u64) {
        if let Some(w) = self.watchers.get(&handle) {
            self.synced.remove(handle, &w.spec);
        }
    }

    /// Moves every synced watcher to catch-up from `from_rev`.
    fn desync_all_synced(&mut self, from_rev: i64) {
        let synced: Vec<u64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.synced)
            .map(|(h, _)| *h)
            .collect();
        for handle in synced {
            self.desync(handle, from_rev);
        }
    }

    fn desync(&mut self, handle: u64, from_rev: i64) {
        self.unindex(handle);
        if let Some(w) = self.watchers.get_mut(&handle) {
            w.synced = false;
            w.next_rev = w.next_rev.max(from_rev);
        }
        self.unsynced.insert(handle);
    }

    fn remove(&mut self, handle: u64) -> Option<Watcher> {
        self.unindex(handle);
        self.unsynced.remove(&handle);
        let w = self.watchers.remove(&handle)?;
        if let Some(s) = self.streams.get_mut(&w.stream) {
            s.ids.remove(&w.watch_id);
        }
        Some(w)
    }
}

/// Why a watcher over `WatchLimits::watchers_per_stream` is refused.
pub const ERR_TOO_MANY_WATCHERS: &str = "mvcc: too many watchers on one watch stream";

/// Bytes and events in one catch-up response, about: a revision is never split, so one
/// revision larger than this goes alone. Small, because past the stream's queue each stream
/// may hold about two messages uncounted (one being encoded, one in HTTP/2's send buffer):
/// with 1,000 streams catching up, 1 MiB messages made that 700 MiB, 64 KiB ones ~128 MiB.
const CATCH_UP_MESSAGE_BYTES: usize = 64 * 1024;
const CATCH_UP_MESSAGE_EVENTS: usize = 1000;

pub struct WatchHub {
    inner: Mutex<Inner>,
    wake: Condvar,
    watchers: AtomicUsize,
}

fn progress_response(revision: i64) -> WatchResponse {
    WatchResponse {
        header: header(revision),
        watch_id: INVALID_WATCH_ID,
        ..Default::default()
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Events of the revisions from one catch-up read, for the catch-up loop.
pub(crate) struct History {
    pub events: Vec<Event>,
    /// The last revision read whole: a read bounded by bytes may stop before the one asked.
    pub to: i64,
}

impl WatchHub {
    pub(crate) fn new(current_rev: i64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                dispatched_rev: current_rev,
                ..Default::default()
            }),
            wake: Condvar::new(),
            watchers: AtomicUsize::new(0),
        }
    }

    /// Whether any watcher exists: when none does, the apply loop skips building events.
    pub fn has_watchers(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0
    }

    pub fn watcher_count(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// The limits of streams opened from now on.
    pub fn set_limits(&self, limits: WatchLimits) {
        let mut inner = self.inner.lock();
        inner.limits = limits;
        inner.total_queued = None;
    }

    /// Bytes queued for every stream together.
    pub fn queued_bytes(&self) -> usize {
        self.inner
            .lock()
            .total_queued
            .as_ref()
            .map_or(0, |t| t.bytes())
    }

    /// Opens a stream; returns its id and the receiving end.
    pub fn open_stream(&self) -> (u64, StreamReceiver) {
        let mut inner = self.inner.lock();
        let limits = inner.limits;
        let total = inner
            .total_queued
            .get_or_insert_with(|| TotalQueued::new(limits.total_queue_bytes))
            .clone();
        let (sink, rx) = stream_queue(limits.stream_queue_bytes, total);
        inner.next_stream += 1;
        let id = inner.next_stream;
        inner.streams.insert(
            id,
            Stream {
                sink,
                next_auto_id: 0,
                ids: HashMap::new(),
                progress_pending: false,
            },
        );
        (id, rx)
    }

    /// Closes a stream and all its watchers.
    pub fn close_stream(&self, stream: u64) {
        let mut inner = self.inner.lock();
        let Some(s) = inner.streams.remove(&stream) else {
            return;
        };
        for handle in s.ids.into_values() {
            if inner.remove(handle).is_some() {
                self.watchers.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Creates a watcher; the "created" response (or a refusal) goes to the stream first.
    /// Returns the watch id, or None when the watcher was refused.
    pub fn watch(&self, stream: u64, spec: WatchSpec, compact_rev: i64) -> Option<i64> {
        let mut inner = self.inner.lock();
        let rev = inner.dispatched_rev;
        let max_watchers = inner.limits.watchers_per_stream;
        let s = inner.streams.get_mut(&stream)?;
        let refuse = |s: &Stream, reason: &str| {
            s.sink.control(WatchResponse {
                header: header(rev),
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason.to_string(),
                ..Default::default()
            })
        };
        if spec.start_revision < 0 {
            refuse(s, ERR_COMPACTED);
            return None;
        }
        if matches!(KeyRange::new(&spec.key, &spec.range_end), KeyRange::Empty) {
            refuse(s, ERR_EMPTY_RANGE);
            return None;
        }
        if s.ids.len() >= max_watchers {
            refuse(s, ERR_TOO_MANY_WATCHERS);
            return None;
        }
        let watch_id = if spec.watch_id != 0 {
            if s.ids.contains_key(&spec.watch_id) {
                refuse(s, ERR_DUPLICATE_ID);
                return None;
            }
            spec.watch_id
        } else {
            while s.ids.contains_key(&s.next_auto_id) {
                s.next_auto_id += 1;
            }
            let id = s.next_auto_id;
            s.next_auto_id += 1;
            id
        };
        s.sink.control(WatchResponse {
            header: header(rev),
            watch_id,
            created: true,
            ..Default::default()
        });
        inner.next_handle += 1;
        let handle = inner.next_handle;
        if let Some(s) = inner.streams.get_mut(&stream) {
            s.ids.insert(watch_id, handle);
        }
        let next_rev = if spec.start_revision == 0 {
            rev + 1
        } else {
            spec.start_revision
        };
        let behind = next_rev <= rev || next_rev < compact_rev;
        inner.watchers.insert(
            handle,
            Watcher {
                stream,
                watch_id,
                spec,
                next_rev,
                synced: !behind,
            },
        );
        self.watchers.fetch_add(1, Ordering::AcqRel);
        if behind {
            inner.unsynced.insert(handle);
            self.wake.notify_one();
        } else {
            inner.index(handle);
        }
        Some(watch_id)
    }

    /// The store's state was replaced (a snapshot from the leader) at `current_rev`: every
    /// watcher is caught up from the new state's history, from the revision it expects next,
    /// as etcd moves every watcher to its unsynced set after a restore. A watcher whose next
    /// revision the new state has compacted away is canceled by the catch-up loop.
    pub fn resync_all(&self, current_rev: i64) {
        let mut inner = self.inner.lock();
        // A synced watcher has had everything up to the dispatched revision (its own next
        // revision is only kept while it is unsynced).
        let resume = inner.dispatched_rev + 1;
        inner.desync_all_synced(resume);
        inner.dispatched_rev = current_rev;
        self.wake.notify_one();
    }

    /// Cancels a watcher; answers with etcd's canceled response if it existed.
    pub fn cancel(&self, stream: u64, watch_id: i64) {
        let mut inner = self.inner.lock();
        let rev = inner.dispatched_rev;
        let Some(handle) = inner
            .streams
            .get(&stream)
            .and_then(|s| s.ids.get(&watch_id).copied())
        else {
            return;
        };
        if inner.remove(handle).is_some() {
            self.watchers.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(s) = inner.streams.get(&stream) {
            s.sink.control(WatchResponse {
                header: header(rev),
                watch_id,
                canceled: true,
                ..Default::default()
            });
        }
    }

    /// Sends a progress notification to each listed watcher that is caught up (an unsynced one
    /// gets events soon, which carry the same information).
    pub fn progress(&self, stream: u64, watch_ids: &[i64]) {
        let inner = self.inner.lock();
        let Some(s) = inner.streams.get(&stream) else {
            return;
        };
        for id in watch_ids {
            let synced = s
                .ids
                .get(id)
                .and_then(|h| inner.watchers.get(h))
                .is_some_and(|w| w.synced);
            if synced {
                s.sink.control(WatchResponse {
                    header: header(inner.dispatched_rev),
                    watch_id: *id,
                    ..Default::default()
                });
            }
        }
    }

    /// Answers a client's RequestProgress: every event up to the returned header revision has
    /// been sent on this stream.
    pub fn progress_all(&self, stream: u64) {
        let mut inner = self.inner.lock();
        let rev = inner.dispatched_rev;
        let Inner {
            streams, watchers, ..
        } = &mut *inner;
        let Some(s) = streams.get_mut(&stream) else {
            return;
        };
        if s.all_synced(watchers) {
            s.sink.control(progress_response(rev));
        } else {
            s.progress_pending = true;
        }
    }

    /// Called by the apply loop after revision `rev` is published. `events` are in revision
    /// order; `None` means the batch was applied without building events (no watcher existed
    /// when it started), so any synced watcher that could have wanted them must catch up.
    pub(crate) fn dispatch(&self, rev: i64, events: Option<&[Event]>) {
        let mut inner = self.inner.lock();
        let prev = inner.dispatched_rev;
        if rev <= prev {
            return;
        }
        inner.dispatched_rev = rev;
        let Some(events) = events else {
            inner.desync_all_synced(prev + 1);
            if !inner.unsynced.is_empty() {
                self.wake.notify_one();
            }
            return;
        };
        let mut per_watcher: HashMap<u64, Vec<Event>> = HashMap::new();
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            for h in inner.synced.candidates(&kv.key) {
                if let Some(w) = inner.watchers.get(&h) {
                    if w.wants(ev) {
                        per_watcher.entry(h).or_default().push(w.shape(ev));
                    }
                }
            }
        }
        let mut full = Vec::new();
        let mut closed = Vec::new();
        for (h, evs) in per_watcher {
            let Some(w) = inner.watchers.get(&h) else {
                continue;
            };
            let Some(s) = inner.streams.get(&w.stream) else {
                continue;
            };
            let msg = WatchResponse {
                header: header(rev),
                watch_id: w.watch_id,
                events: evs,
                ..Default::default()
            };
            match s.sink.events(msg) {
                Delivery::Sent => {}
                Delivery::Full => full.push(h),
                Delivery::Closed => closed.push(h),
            }
        }
        for h in full {
            inner.desync(h, prev + 1);
        }
        for h in closed {
            if inner.remove(h).is_some() {
                self.watchers.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !inner.unsynced.is_empty() {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
