//! Catching unsynced watchers up from the store's history, in bounded rounds.
//!
//! A round has three steps. Under the hub's lock: cancel watchers whose start was compacted
//! away, and pick the watchers whose streams have room, with a copy of what they asked for.
//! Without the lock: read the history they need (bounded by bytes) and build each one's
//! messages, only as many bytes as its stream can take. Under the lock again: hand each
//! watcher its messages if it is still the same watcher at the same revision. The apply
//! loop's dispatch, which needs the same lock, never waits for the filtering.

use super::*;

/// A watcher picked for a round, as it was when picked.
struct Candidate {
    handle: u64,
    watcher: Watcher,
    /// Bytes its stream can take now.
    room: usize,
}

/// A candidate's messages, and the revision it reaches if all of them are delivered.
struct Prepared {
    handle: u64,
    picked_at: i64,
    messages: Vec<(WatchResponse, i64)>,
    /// Every revision up to `to` considered (none left out for want of room).
    complete: bool,
}

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
        let Some((candidates, budget, from, to, compact)) = self.pick(compact_rev, wait) else {
            return true;
        };
        if candidates.is_empty() {
            return false;
        }
        // Read without the lock: the apply loop keeps going meanwhile.
        let history = match read(from, to) {
            Some(h) => h,
            None => return false,
        };
        let to = history.to.min(to);
        if compact_rev() != compact {
            // A compaction ran during the read: what we read may have holes. Try again.
            return false;
        }
        // What all streams together can take bounds what is built for them.
        let mut budget = budget;
        let prepared: Vec<Prepared> = candidates
            .into_iter()
            .map(|c| prepare(c, &history.events, to, &mut budget))
            .collect();
        self.deliver(prepared, to)
    }

    /// Step one, under the lock. None: nobody is behind.
    fn pick(
        &self,
        compact_rev: &dyn Fn() -> i64,
        wait: std::time::Duration,
    ) -> Option<(Vec<Candidate>, usize, i64, i64, i64)> {
        let mut inner = self.inner.lock();
        if inner.unsynced.is_empty() {
            self.wake.wait_for(&mut inner, wait);
            if inner.unsynced.is_empty() {
                return None;
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
        // A watcher that starts after everything dispatched is caught up already.
        let ahead: Vec<u64> = inner
            .unsynced
            .iter()
            .filter(|h| inner.watchers.get(h).is_some_and(|w| w.next_rev > to))
            .copied()
            .collect();
        for h in ahead {
            inner.unsynced.remove(&h);
            if let Some(w) = inner.watchers.get_mut(&h) {
                w.synced = true;
            }
            inner.index(h);
        }
        // Watchers whose stream is full cannot take anything now: they neither hold the read
        // window back nor cost any work.
        let candidates: Vec<Candidate> = inner
            .unsynced
            .iter()
            .filter_map(|h| {
                let w = inner.watchers.get(h)?;
                let room = inner.streams.get(&w.stream)?.sink.room_bytes();
                (room > 0).then(|| Candidate {
                    handle: *h,
                    watcher: w.clone(),
                    room,
                })
            })
            .collect();
        let from = candidates
            .iter()
            .map(|c| c.watcher.next_rev)
            .min()
            .unwrap_or(to + 1);
        let to = to.min(from.saturating_add(MAX_REVISIONS_PER_ROUND - 1));
        // At least one message's worth, so that a round always moves someone forward.
        let budget = inner
            .total_queued
            .as_ref()
            .map_or(usize::MAX, |t| t.room())
            .max(CATCH_UP_MESSAGE_BYTES);
        Some((candidates, budget, from, to, compact))
    }

    /// Step three, under the lock: each watcher still as it was picked gets its messages, as
    /// many as its stream takes now. Returns whether every unsynced watcher caught up.
    fn deliver(&self, prepared: Vec<Prepared>, to: i64) -> bool {
        let mut inner = self.inner.lock();
        for p in prepared {
            let Some(w) = inner.watchers.get(&p.handle) else {
                continue;
            };
            if w.synced || w.next_rev != p.picked_at {
                continue;
            }
            let Some(s) = inner.streams.get(&w.stream) else {
                continue;
            };
            let mut next_rev = w.next_rev;
            let mut delivered_all = p.complete;
            for (msg, last) in p.messages {
                match s.sink.events(msg) {
                    Delivery::Sent => next_rev = last + 1,
                    Delivery::Full | Delivery::Closed => {
                        delivered_all = false;
                        break;
                    }
                }
            }
            if delivered_all {
                // A watcher starting past this round's window keeps its start.
                next_rev = next_rev.max(to + 1);
            }
            let dispatched = inner.dispatched_rev;
            let caught_up = next_rev == dispatched + 1;
            if let Some(w) = inner.watchers.get_mut(&p.handle) {
                w.next_rev = next_rev;
                w.synced = caught_up;
            }
            if caught_up {
                inner.unsynced.remove(&p.handle);
                inner.index(p.handle);
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
        inner.unsynced.is_empty()
    }
}

/// Step two, without the lock: a candidate's events from `history` (revisions up to `to`),
/// in messages of whole revisions, up to the room its stream had and what is left of the
/// `budget` for all streams.
fn prepare(c: Candidate, history: &[Event], to: i64, budget: &mut usize) -> Prepared {
    use prost::Message as _;
    let w = &c.watcher;
    let mut messages = Vec::new();
    let mut bytes = 0;
    let mut complete = true;
    let mut chunk: Vec<Event> = Vec::new();
    let mut chunk_bytes = 0;
    let rev_of = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let mut flush = |chunk: &mut Vec<Event>, chunk_bytes: &mut usize| {
        let Some(last) = chunk.last().map(rev_of) else {
            return;
        };
        let msg = WatchResponse {
            header: header(to),
            watch_id: w.watch_id,
            events: std::mem::take(chunk),
            ..Default::default()
        };
        messages.push((msg, last));
        *chunk_bytes = 0;
    };
    for ev in history.iter().filter(|e| w.wants(e)) {
        let rev = rev_of(ev);
        let starts_revision = chunk.last().is_none_or(|last| rev_of(last) != rev);
        if starts_revision {
            if chunk.len() >= CATCH_UP_MESSAGE_EVENTS || chunk_bytes >= CATCH_UP_MESSAGE_BYTES {
                bytes += chunk_bytes;
                flush(&mut chunk, &mut chunk_bytes);
            }
            let taken = bytes + chunk_bytes;
            if taken >= c.room || taken >= *budget {
                // The stream cannot take more now: the rest comes in a later round.
                complete = false;
                break;
            }
        }
        let ev = w.shape(ev);
        chunk_bytes += ev.encoded_len();
        chunk.push(ev);
    }
    bytes += chunk_bytes;
    flush(&mut chunk, &mut chunk_bytes);
    *budget = budget.saturating_sub(bytes);
    Prepared {
        handle: c.handle,
        picked_at: c.watcher.next_rev,
        messages,
        complete,
    }
}
