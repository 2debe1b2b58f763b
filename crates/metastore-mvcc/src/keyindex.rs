//! The in-memory key index: for every user key, the revisions at which it was written.
//!
//! The engine stores records by revision; this index answers "which revision of key K is visible
//! at revision R" without touching the engine. Each key's revision list sits behind its own small
//! lock, so readers of different keys never contend and no global lock exists. The lists are
//! reachable two ways: a lock-free skiplist in key order for ranges, and a sharded hash map for
//! single keys. A put and a point read are the hot path, and a skiplist search costs a cache miss
//! per level (profiled: ~45 % of the apply thread's time at 100k keys); the hash map finds a key
//! in one or two.

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use dashmap::DashMap;
use parking_lot::RwLock;
use std::ops::Bound;
use std::sync::Arc;

/// A revision: `main` is the store revision of the write, `sub` orders changes inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexRev {
    pub rev: Revision,
    pub tombstone: bool,
    /// `create_revision`, `version` and `lease` of the record at `rev` (zero for a tombstone):
    /// all a put or a delete needs of the previous record, so they need not load it.
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl IndexRev {
    pub fn live(rev: Revision, create_revision: i64, version: i64, lease: i64) -> Self {
        IndexRev {
            rev,
            tombstone: false,
            create_revision,
            version,
            lease,
        }
    }

    pub fn tombstone(rev: Revision) -> Self {
        IndexRev {
            rev,
            tombstone: true,
            create_revision: 0,
            version: 0,
            lease: 0,
        }
    }
}

/// One key's revisions, oldest first.
type Revs = Arc<RwLock<Vec<IndexRev>>>;

/// One key's revision list, searched for once and then both read and appended to, as a put
/// does.
pub struct KeySlot(Revs);

impl KeySlot {
    /// The live revision at `rev`, as [`KeyIndex::get`].
    pub fn visible(&self, rev: i64) -> Option<IndexRev> {
        visible(&self.0.read(), rev)
    }

    /// Records a write, as [`KeyIndex::push`].
    pub fn push(&self, entry: IndexRev) {
        let mut revs = self.0.write();
        if revs.capacity() == 0 {
            // A plain push would allocate room for 4; most keys keep one revision after
            // compaction, and with a million keys the spare room was ~170 MB of RSS.
            revs.reserve_exact(1);
        }
        revs.push(entry);
    }
}

/// Both maps hold the same slots; only the single writer (the apply loop) adds or removes
/// them, always in both.
#[derive(Default)]
pub struct KeyIndex {
    /// In key order, for ranges.
    keys: SkipMap<Bytes, Revs>,
    /// By hash, for single keys.
    points: DashMap<Bytes, Revs, foldhash::fast::RandomState>,
}

/// The key range of a request, as etcd interprets `key` / `range_end`.
pub enum KeyRange<'a> {
    Single(&'a [u8]),
    Span(Bound<&'a [u8]>, Bound<&'a [u8]>),
    Empty,
}

impl<'a> KeyRange<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        if range_end.is_empty() {
            KeyRange::Single(key)
        } else if range_end == [0] {
            // "\0" as range_end means every key >= key.
            KeyRange::Span(Bound::Included(key), Bound::Unbounded)
        } else if range_end <= key {
            KeyRange::Empty
        } else {
            KeyRange::Span(Bound::Included(key), Bound::Excluded(range_end))
        }
    }
}

/// The newest entry at or below `rev`, if it is a live (non-tombstone) one.
fn visible(revs: &[IndexRev], rev: i64) -> Option<IndexRev> {
    let pos = revs.partition_point(|r| r.rev.main <= rev);
    if pos == 0 {
        return None;
    }
    let r = revs[pos - 1];
    (!r.tombstone).then_some(r)
}

impl KeyIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Visits, in key order, every key in `range` that is live at `rev`, with its visible revision.
    /// Stops when `visit` returns false.
    pub fn visit(
        &self,
        range: &KeyRange<'_>,
        rev: i64,
        visit: &mut dyn FnMut(&Bytes, IndexRev) -> bool,
    ) {
        match range {
            KeyRange::Empty => {}
            KeyRange::Single(key) => {
                // The map's shard lock is released before `visit` runs (it may read the engine).
                let found = self.points.get(*key).and_then(|entry| {
                    visible(&entry.value().read(), rev).map(|r| (entry.key().clone(), r))
                });
                if let Some((key, r)) = found {
                    visit(&key, r);
                }
            }
            KeyRange::Span(lo, hi) => {
                for entry in self.keys.range::<[u8], _>((*lo, *hi)) {
                    let found = visible(&entry.value().read(), rev);
                    if let Some(r) = found {
                        if !visit(entry.key(), r) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The live revision of one key at `rev`.
    pub fn get(&self, key: &[u8], rev: i64) -> Option<IndexRev> {
        self.points
            .get(key)
            .and_then(|e| visible(&e.value().read(), rev))
    }

    /// The slot of `key`, created (with no revisions, so invisible to readers) if missing.
    /// Only the single writer may call this: compaction removes empty slots.
    pub fn slot(&self, key: &Bytes) -> KeySlot {
        if let Some(entry) = self.points.get(&key[..]) {
            return KeySlot(entry.value().clone());
        }
        let revs = Revs::default();
        // Copied: the caller's key may be a slice of a whole raft entry, which the index
        // would otherwise keep alive for as long as the key exists.
        let key = Bytes::copy_from_slice(key);
        self.keys.insert(key.clone(), revs.clone());
        self.points.insert(key, revs.clone());
        KeySlot(revs)
    }

    /// Records a write. Revisions must arrive in increasing order per key (the apply loop
    /// guarantees it).
    pub fn push(&self, key: &Bytes, entry: IndexRev) {
        self.slot(key).push(entry);
    }

    /// [`push`](Self::push) of a key the caller owns exactly (not a slice of a larger
    /// buffer): a new key is kept as it is instead of copied, as rebuilding the index does
    /// for millions of keys.
    pub fn push_owned(&self, key: Bytes, entry: IndexRev) {
        if let Some(slot) = self.points.get(&key[..]) {
            let revs = slot.value().clone();
            drop(slot);
            return KeySlot(revs).push(entry);
        }
        let revs = Revs::default();
        KeySlot(revs.clone()).push(entry);
        self.keys.insert(key.clone(), revs.clone());
        self.points.insert(key, revs);
    }

    /// Drops every revision superseded at or below `rev`, keeping the newest one at or below it
    /// unless that is a tombstone. Returns the dropped revisions with their tombstone flags so
    /// the caller can delete their records.
    pub fn compact(&self, rev: i64) -> Vec<IndexRev> {
        let mut dropped = Vec::new();
        let mut after = None;
        loop {
            let (mut step, next) = self.compact_step(rev, after.as_ref(), usize::MAX);
            dropped.append(&mut step);
            match next {
                Some(k) => after = Some(k),
                None => return dropped,
            }
        }
    }

    /// [`compact`](Self::compact) of at most `limit` keys, those after `after` (from the first
    /// key when None). Returns the dropped revisions and the last key visited when keys may
    /// remain (None: the end was reached). Only the single writer may call this.
    pub fn compact_step(
        &self,
        rev: i64,
        after: Option<&Bytes>,
        limit: usize,
    ) -> (Vec<IndexRev>, Option<Bytes>) {
        let mut dropped = Vec::new();
        let mut emptied = Vec::new();
        let lower = match after {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Unbounded,
        };
        let mut visited = 0usize;
        let mut last = None;
        for entry in self.keys.range::<[u8], _>((lower, Bound::Unbounded)) {
            if visited == limit {
                break;
            }
            visited += 1;
            last = Some(entry.key().clone());
            let mut revs = entry.value().write();
            let pos = revs.partition_point(|r| r.rev.main <= rev);
            if pos == 0 {
                continue;
            }
            let cut = if revs[pos - 1].tombstone {
                pos
            } else {
                pos - 1
            };
            if cut == 0 {
                continue;
            }
            dropped.extend(revs.drain(..cut));
            if revs.is_empty() {
                emptied.push(entry.key().clone());
            }
        }
        for key in emptied {
            // Only remove if still empty: the single writer is the caller, so it is.
            if let Some(e) = self.keys.get(&key[..]) {
                if e.value().read().is_empty() {
                    e.remove();
                    self.points.remove(&key[..]);
                }
            }
        }
        let more = visited == limit;
        (dropped, if more { last } else { None })
    }

    /// Forgets every key (the state is being replaced by a snapshot). Only the single writer
    /// may call this.
    pub fn clear(&self) {
        self.keys.clear();
        self.points.clear();
    }

    /// Number of keys with any history (live or not).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ir(main: i64, tombstone: bool) -> IndexRev {
        let rev = Revision { main, sub: 0 };
        if tombstone {
            IndexRev::tombstone(rev)
        } else {
            IndexRev::live(rev, main, 1, 0)
        }
    }

    #[test]
    fn visibility_and_compaction() {
        let idx = KeyIndex::new();
        let k = Bytes::from_static(b"k");
        idx.push(&k, ir(2, false));
        idx.push(&k, ir(4, false));
        idx.push(&k, ir(6, true));
        idx.push(&k, ir(8, false));
        assert_eq!(idx.get(b"k", 1), None);
        assert_eq!(idx.get(b"k", 3), Some(ir(2, false)));
        assert_eq!(idx.get(b"k", 5), Some(ir(4, false)));
        assert_eq!(idx.get(b"k", 7), None);
        assert_eq!(idx.get(b"k", 9), Some(ir(8, false)));
        // Compacting at 5 keeps rev 4 (newest <= 5) and drops rev 2.
        assert_eq!(idx.compact(5), vec![ir(2, false)]);
        assert_eq!(idx.get(b"k", 5), Some(ir(4, false)));
        // Compacting at 7 drops 4 and the tombstone at 6.
        assert_eq!(idx.compact(7), vec![ir(4, false), ir(6, true)]);
        assert_eq!(idx.get(b"k", 9), Some(ir(8, false)));
        let j = Bytes::from_static(b"j");
        idx.push(&j, ir(10, false));
        idx.push(&j, ir(11, true));
        assert_eq!(idx.compact(11).len(), 2);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn slot_reads_and_appends_one_key() {
        let idx = KeyIndex::new();
        let k = Bytes::from_static(b"k");
        let slot = idx.slot(&k);
        assert_eq!(slot.visible(10), None);
        slot.push(ir(2, false));
        assert_eq!(idx.get(b"k", 3), Some(ir(2, false)));
        let again = idx.slot(&k);
        assert_eq!(again.visible(3), Some(ir(2, false)));
        again.push(ir(4, true));
        assert_eq!(idx.get(b"k", 5), None);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn a_new_key_is_copied_out_of_the_callers_buffer() {
        let idx = KeyIndex::new();
        let entry = Bytes::from(b"....key....".to_vec());
        let key = entry.slice(4..7);
        idx.slot(&key).push(ir(2, false));
        let mut stored = None;
        idx.visit(&KeyRange::new(b"key", b"kez"), 5, &mut |k, _| {
            stored = Some(k.clone());
            true
        });
        let stored = stored.expect("key indexed");
        assert_eq!(stored, key);
        assert!(!entry.as_ptr_range().contains(&stored.as_ptr()));
    }

    #[test]
    fn key_ranges() {
        assert!(matches!(KeyRange::new(b"b", b"a"), KeyRange::Empty));
        assert!(matches!(KeyRange::new(b"b", b"b"), KeyRange::Empty));
        assert!(matches!(KeyRange::new(b"b", b""), KeyRange::Single(_)));
        assert!(matches!(
            KeyRange::new(b"b", b"\0"),
            KeyRange::Span(Bound::Included(_), Bound::Unbounded)
        ));
    }
}
