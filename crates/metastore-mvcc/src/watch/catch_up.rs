//! Catching unsynced watchers up from the store's history, in bounded rounds.

use super::*;

impl WatchHub {
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
            History {
                events: Vec::new(),
                to,
            }
        };
        let to = history.to.min(to);
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
            for chunk in chunk_by_revision(&mine, 1000, CATCH_UP_MESSAGE_BYTES) {
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

/// Splits events into chunks of at most about `max_events` events and `max_bytes` bytes,
/// never splitting one revision.
pub(super) fn chunk_by_revision(
    events: &[Event],
    max_events: usize,
    max_bytes: usize,
) -> Vec<&[Event]> {
    use prost::Message as _;
    let rev_of = |e: &Event| e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or_default();
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < events.len() && end - start < max_events && bytes < max_bytes {
            bytes += events[end].encoded_len();
            end += 1;
        }
        while end < events.len() && rev_of(&events[end]) == rev_of(&events[end - 1]) {
            end += 1;
        }
        out.push(&events[start..end]);
        start = end;
    }
    out
}
