//! The memory engine: one lock-free ordered map (crossbeam-skiplist) per key space.
//!
//! Readers never take a lock. Writes are expected from a single writer (the apply loop): the
//! skiplist crate has known races between concurrent writers of the same key, which this usage
//! avoids. Nothing is persisted here; durability comes from the raft WAL (and snapshots).

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use metastore_engine::{Engine, Result, Space, WriteBatch, WriteOp};
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Default)]
pub struct MemoryEngine {
    kv: SkipMap<Bytes, Bytes>,
    meta: SkipMap<Bytes, Bytes>,
    size: AtomicI64,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn space(&self, space: Space) -> &SkipMap<Bytes, Bytes> {
        match space {
            Space::Kv => &self.kv,
            Space::Meta => &self.meta,
        }
    }

    /// Number of entries in a space.
    pub fn len(&self, space: Space) -> usize {
        self.space(space).len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty() && self.meta.is_empty()
    }
}

impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.space(space).get(key).map(|e| e.value().clone()))
    }

    fn scan(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()> {
        for entry in self.space(space).range::<[u8], _>(range) {
            if !visit(entry.key(), entry.value()) {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut delta = 0i64;
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { space, key, value } => {
                    delta += (key.len() + value.len()) as i64;
                    // The replaced value is sized inside the insert's own search (with one
                    // writer the closure sees each live old entry once) instead of a `get`
                    // first: revision keys are always new, so that was a second search per put.
                    let replaced = std::cell::Cell::new(0i64);
                    let key_len = key.len() as i64;
                    self.space(space).compare_insert(key, value, |old| {
                        replaced.set(replaced.get() + key_len + old.len() as i64);
                        true
                    });
                    delta -= replaced.get();
                }
                WriteOp::Delete { space, key } => {
                    if let Some(old) = self.space(space).remove(&key[..]) {
                        delta -= (old.key().len() + old.value().len()) as i64;
                    }
                }
            }
        }
        self.size.fetch_add(delta, Ordering::Relaxed);
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed).max(0) as u64
    }

    fn is_persistent(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn collect(e: &MemoryEngine, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        e.scan(Space::Kv, (lo, hi), &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .expect("scan");
        out
    }

    #[test]
    fn put_get_delete_scan() {
        let e = MemoryEngine::new();
        let mut b = WriteBatch::new();
        for k in ["b", "a", "c", "d"] {
            b.put(Space::Kv, k.as_bytes().to_vec(), k.repeat(3).into_bytes());
        }
        b.put(Space::Meta, &b"x"[..], &b"1"[..]);
        e.write(b).expect("write");
        assert_eq!(
            e.get(Space::Kv, b"a").expect("get").as_deref(),
            Some(&b"aaa"[..])
        );
        assert_eq!(e.get(Space::Meta, b"a").expect("get"), None);
        assert_eq!(
            collect(&e, Bound::Included(b"b"), Bound::Excluded(b"d")),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(collect(&e, Bound::Unbounded, Bound::Unbounded).len(), 4);
        assert_eq!(e.size_bytes(), 4 * 4 + 2);
        let mut b = WriteBatch::new();
        b.delete(Space::Kv, &b"a"[..]);
        b.delete(Space::Kv, &b"zz"[..]);
        e.write(b).expect("write");
        assert_eq!(e.get(Space::Kv, b"a").expect("get"), None);
        assert_eq!(e.size_bytes(), 3 * 4 + 2);
        // Overwrites count the new size in place of the old, also twice in one batch.
        let mut b = WriteBatch::new();
        b.put(Space::Kv, &b"b"[..], &b"bbbbbbb"[..]);
        b.put(Space::Kv, &b"c"[..], &b"c"[..]);
        b.put(Space::Kv, &b"c"[..], &b"cc"[..]);
        e.write(b).expect("write");
        assert_eq!(e.size_bytes(), (1 + 7) + (1 + 2) + 4 + 2);
        assert_eq!(e.len(Space::Kv), 3);
    }

    #[test]
    fn scan_stops_when_asked() {
        let e = MemoryEngine::new();
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(Space::Kv, vec![i], vec![i]);
        }
        e.write(b).expect("write");
        let mut seen = 0;
        e.scan(
            Space::Kv,
            (Bound::Unbounded, Bound::Unbounded),
            &mut |_, _| {
                seen += 1;
                seen < 3
            },
        )
        .expect("scan");
        assert_eq!(seen, 3);
    }

    /// Readers running while the single writer inserts must always find keys written before
    /// they started, and scans must stay ordered.
    #[test]
    fn concurrent_readers_during_writes() {
        let e = Arc::new(MemoryEngine::new());
        let mut b = WriteBatch::new();
        for i in 0u32..1000 {
            b.put(Space::Kv, i.to_be_bytes().to_vec(), vec![1]);
        }
        e.write(b).expect("write");
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for round in 0..200u32 {
                        let k = (round * 7 % 1000).to_be_bytes();
                        assert!(e.get(Space::Kv, &k).expect("get").is_some());
                        let mut last: Option<Vec<u8>> = None;
                        e.scan(
                            Space::Kv,
                            (Bound::Unbounded, Bound::Unbounded),
                            &mut |k, _| {
                                if let Some(prev) = &last {
                                    assert!(prev.as_slice() < k);
                                }
                                last = Some(k.to_vec());
                                true
                            },
                        )
                        .expect("scan");
                    }
                })
            })
            .collect();
        for i in 1000u32..20_000 {
            let mut b = WriteBatch::new();
            b.put(Space::Kv, i.to_be_bytes().to_vec(), vec![2]);
            e.write(b).expect("write");
        }
        for r in readers {
            r.join().expect("reader");
        }
        assert_eq!(e.len(Space::Kv), 20_000);
    }
}
