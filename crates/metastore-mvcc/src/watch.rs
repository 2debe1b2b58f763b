//! The watch hub: delivers the store's events to watchers, in revision order, each exactly once.
//!
//! As in etcd, watchers are *synced* (caught up: the apply loop hands them events as revisions
//! are applied) or *unsynced* (behind: a catch-up loop reads their events back from the store's
//! history). A watcher whose stream is full is never waited for: it drops to unsynced and
//! catches up later, so slow watchers neither block writes nor grow memory without bound.
//!
//! All messages of one stream (created, events, progress, canceled) travel in one channel, in
//! the order the hub decided them under its lock; event messages are refused once the stream
//! holds more than its limit, control messages never are.

use crate::keyindex::KeyRange;
use bytes::Bytes;
use metastore_proto::etcdserverpb::{ResponseHeader, WatchResponse};
use metastore_proto::mvccpb::{event::EventType, Event};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The watch id etcd uses for responses not tied to one watcher.
pub const INVALID_WATCH_ID: i64 = -1;

pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const ERR_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// The receiving end of a watch stream.
pub struct StreamReceiver {
    rx: mpsc::UnboundedReceiver<WatchResponse>,
    queued: Arc<AtomicUsize>,
}

impl StreamReceiver {
    pub async fn recv(&mut self) -> Option<WatchResponse> {
        let msg = self.rx.recv().await?;
        if !msg.events.is_empty() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        Some(msg)
    }
}

#[derive(Clone)]
struct StreamSink {
    tx: mpsc::UnboundedSender<WatchResponse>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

enum Delivery {
    Sent,
    Full,
    Closed,
}

impl StreamSink {
    fn control(&self, msg: WatchResponse) {
        let _ = self.tx.send(msg);
    }

    fn events(&self, msg: WatchResponse) -> Delivery {
        if self.tx.is_closed() {
            return Delivery::Closed;
        }
        if self.queued.load(Ordering::Acquire) >= self.limit {
            return Delivery::Full;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.send(msg) {
            Ok(()) => Delivery::Sent,
            Err(_) => Delivery::Closed,
        }
    }
}

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

impl StreamSink {
    fn is_full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= self.limit
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
    /// Synced single-key watchers by key; synced range watchers apart.
    by_key: HashMap<Bytes, HashSet<u64>>,
    ranges: HashSet<u64>,
    unsynced: HashSet<u64>,
    /// Every revision up to this one has been handed to synced watchers.
    dispatched_rev: i64,
}

impl Inner {
    fn index(&mut self, handle: u64) {
        let Some(w) = self.watchers.get(&handle) else {
            return;
        };
        if w.spec.range_end.is_empty() {
            self.by_key
                .entry(w.spec.key.clone())
                .or_default()
                .insert(handle);
        } else {
            self.ranges.insert(handle);
        }
    }

    fn unindex(&mut self, handle: u64) {
        let Some(w) = self.watchers.get(&handle) else {
            return;
        };
        if w.spec.range_end.is_empty() {
            if let Some(set) = self.by_key.get_mut(&w.spec.key) {
                set.remove(&handle);
                if set.is_empty() {
                    self.by_key.remove(&w.spec.key);
                }
            }
        } else {
            self.ranges.remove(&handle);
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

/// Per-stream limit of undelivered event responses before watchers drop to catch-up mode.
pub const STREAM_EVENT_LIMIT: usize = 1024;

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

    /// Opens a stream; returns its id and the receiving end.
    pub fn open_stream(&self) -> (u64, StreamReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut inner = self.inner.lock();
        inner.next_stream += 1;
        let id = inner.next_stream;
        inner.streams.insert(
            id,
            Stream {
                sink: StreamSink {
                    tx,
                    queued: queued.clone(),
                    limit: STREAM_EVENT_LIMIT,
                },
                next_auto_id: 0,
                ids: HashMap::new(),
                progress_pending: false,
            },
        );
        (id, StreamReceiver { rx, queued })
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
            let candidates = inner
                .by_key
                .get(&kv.key)
                .into_iter()
                .flatten()
                .chain(inner.ranges.iter());
            for h in candidates {
                if let Some(w) = inner.watchers.get(h) {
                    if w.wants(ev) {
                        per_watcher.entry(*h).or_default().push(w.shape(ev));
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

    /// One round of catch-up for unsynced watchers, reading history with `read`
    /// (from, to inclusive) from the store. Waits up to `wait` when nobody is behind. Returns
    /// false when some watcher is still behind (its stream was full, or a compaction raced the
    /// read): the caller pauses briefly before the next round instead of spinning.
    pub(crate) fn sync_round(
        &self,
        compact_rev: &dyn Fn() -> i64,
        read: &dyn Fn(i64, i64) -> Option<History>,
        wait: std::time::Duration,
    ) -> bool {
        // Pick the work under the lock.
        let (from, to, compact) = {
            let mut inner = self.inner.lock();
            if inner.unsynced.is_empty() {
                self.wake.wait_for(&mut inner, wait);
                if inner.unsynced.is_empty() {
                    return true;
                }
            }
            let compact = compact_rev();
            let to = inner.dispatched_rev;
            // Watchers whose start was compacted away are canceled, as etcd does.
            let lost: Vec<u64> = inner
                .unsynced
                .iter()
                .filter(|h| inner.watchers.get(h).is_some_and(|w| w.next_rev < compact))
                .copied()
                .collect();
            for h in lost {
                if let Some(w) = inner.remove(h) {
                    self.watchers.fetch_sub(1, Ordering::AcqRel);
                    if let Some(s) = inner.streams.get(&w.stream) {
                        s.sink.control(WatchResponse {
                            header: header(to),
                            watch_id: w.watch_id,
                            compact_revision: compact,
                            canceled: true,
                            ..Default::default()
                        });
                    }
                }
            }
            // Watchers whose stream is full cannot take anything now: they do not hold the
            // read window back.
            let from = inner
                .unsynced
                .iter()
                .filter_map(|h| inner.watchers.get(h))
                .filter(|w| {
                    inner
                        .streams
                        .get(&w.stream)
                        .is_some_and(|s| !s.sink.is_full())
                })
                .map(|w| w.next_rev)
                .min();
            match from {
                None => return inner.unsynced.is_empty(),
                Some(from) => (
                    from,
                    to.min(from.saturating_add(MAX_REVISIONS_PER_ROUND - 1)),
                    compact,
                ),
            }
        };
        // Read without the lock: the apply loop keeps going meanwhile.
        let history = if from <= to {
            match read(from, to) {
                Some(h) => h,
                None => return false,
            }
        } else {
            History { events: Vec::new() }
        };
        if compact_rev() != compact {
            // A compaction ran during the read: what we read may have holes. Try again.
            return false;
        }
        let mut inner = self.inner.lock();
        let handles: Vec<u64> = inner.unsynced.iter().copied().collect();
        let mut all_caught_up = true;
        for h in handles {
            let Some(w) = inner.watchers.get(&h) else {
                continue;
            };
            if w.next_rev < from {
                // Created while we read, further back than what we read: next round.
                all_caught_up = false;
                continue;
            }
            if w.next_rev > to + 1 {
                // Future start revision: nothing to read yet.
                if w.next_rev > inner.dispatched_rev {
                    inner.unsynced.remove(&h);
                    if let Some(w) = inner.watchers.get_mut(&h) {
                        w.synced = true;
                    }
                    inner.index(h);
                }
                continue;
            }
            let Some(s) = inner.streams.get(&w.stream) else {
                continue;
            };
            let mut next_rev = w.next_rev;
            let mut delivered_all = true;
            // Group by revision so one revision never spans two responses.
            let mine: Vec<Event> = history
                .events
                .iter()
                .filter(|e| w.wants(e))
                .map(|e| w.shape(e))
                .collect();
            for chunk in chunk_by_revision(&mine, 1000) {
                let last = chunk
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision)
                    .unwrap_or(to);
                let msg = WatchResponse {
                    header: header(to),
                    watch_id: w.watch_id,
                    events: chunk.to_vec(),
                    ..Default::default()
                };
                match s.sink.events(msg) {
                    Delivery::Sent => next_rev = last + 1,
                    Delivery::Full | Delivery::Closed => {
                        delivered_all = false;
                        break;
                    }
                }
            }
            if delivered_all {
                next_rev = to + 1;
            }
            let dispatched = inner.dispatched_rev;
            if let Some(w) = inner.watchers.get_mut(&h) {
                w.next_rev = next_rev;
                if next_rev == dispatched + 1 {
                    w.synced = true;
                }
            }
            if next_rev == dispatched + 1 {
                inner.unsynced.remove(&h);
                inner.index(h);
            } else {
                all_caught_up = false;
            }
        }
        let rev = inner.dispatched_rev;
        let Inner {
            streams, watchers, ..
        } = &mut *inner;
        for s in streams.values_mut() {
            if s.progress_pending && s.all_synced(watchers) {
                s.progress_pending = false;
                s.sink.control(progress_response(rev));
            }
        }
        all_caught_up
    }
}

/// Splits events into chunks of about `max` events, never splitting one revision.
fn chunk_by_revision(events: &[Event], max: usize) -> Vec<&[Event]> {
    let rev_of = |e: &Event| e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or_default();
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = (start + max).min(events.len());
        while end < events.len() && rev_of(&events[end]) == rev_of(&events[end - 1]) {
            end += 1;
        }
        out.push(&events[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::KeyValue;

    fn put_event(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn spec(key: &str, start: i64) -> WatchSpec {
        WatchSpec {
            key: key.as_bytes().to_vec().into(),
            start_revision: start,
            ..Default::default()
        }
    }

    fn revisions(rx: &mut StreamReceiver) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.rx.try_recv() {
            out.extend(
                msg.events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision),
            );
        }
        out
    }

    /// A watcher created while a catch-up round reads history, starting further back than that
    /// read, must not be handed the partial history (it would silently skip revisions).
    #[test]
    fn watcher_created_during_a_catch_up_read_waits_for_the_next_round() {
        let history: Vec<Event> = (2..=9).map(|r| put_event("k", r)).collect();
        let hub = WatchHub::new(9);
        let (stream, mut rx) = hub.open_stream();
        hub.watch(stream, spec("k", 6), -1);
        let late = std::cell::Cell::new(false);
        let read = |from: i64, to: i64| {
            if !late.replace(true) {
                // A second watcher arrives, from revision 3, while history [6, 9] is read.
                hub.watch(stream, spec("k", 3), -1);
            }
            Some(History {
                events: history
                    .iter()
                    .filter(|e| {
                        e.kv.as_ref()
                            .is_some_and(|kv| (from..=to).contains(&kv.mod_revision))
                    })
                    .cloned()
                    .collect(),
            })
        };
        let caught_up = hub.sync_round(&|| -1, &read, std::time::Duration::ZERO);
        assert!(!caught_up, "the late watcher is still behind");
        assert!(hub.sync_round(&|| -1, &read, std::time::Duration::ZERO));
        // First watcher: 6..=9; second: 3..=9 — all of it, from the second round.
        let mut got = revisions(&mut rx);
        got.sort_unstable();
        assert_eq!(got, vec![3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9]);
    }

    #[test]
    fn a_full_stream_drops_its_watcher_to_catch_up_instead_of_blocking() {
        let hub = WatchHub::new(1);
        let (stream, mut rx) = hub.open_stream();
        hub.watch(stream, spec("k", 0), -1);
        for rev in 2..(2 + STREAM_EVENT_LIMIT as i64 + 10) {
            hub.dispatch(rev, Some(&[put_event("k", rev)]));
        }
        // The stream holds its limit; the rest waits in the store's history, not in memory.
        let delivered = revisions(&mut rx);
        assert_eq!(delivered.len(), STREAM_EVENT_LIMIT);
        assert_eq!(hub.inner.lock().unsynced.len(), 1);
    }
}
