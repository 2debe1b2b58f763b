//! Which synced watchers an event's key may concern, without checking every range watcher.
//!
//! Single-key watchers are found by their key. Prefix watchers (`--prefix`: a range ending
//! at the key's prefix end, the common shape: Kubernetes watches one prefix per resource
//! type) are found by looking up each prefix of the event's key whose length some watcher
//! uses, so the cost follows the number of distinct prefix lengths, not of watchers. Other
//! ranges (rare) are checked one by one. Every candidate is still checked in full by
//! `Watcher::wants`.

use super::WatchSpec;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Default)]
pub(super) struct SyncedIndex {
    by_key: HashMap<Bytes, HashSet<u64>>,
    by_prefix: HashMap<Bytes, HashSet<u64>>,
    /// How many distinct prefixes of each length are in `by_prefix`.
    prefix_lengths: BTreeMap<usize, usize>,
    ranges: HashSet<u64>,
}

enum Shape<'a> {
    Key(&'a Bytes),
    Prefix(Bytes),
    Range,
}

/// etcd's `GetPrefixRangeEnd`: the first key past every key that starts with `key`; `[0]`
/// (every key from `key` on) when there is none.
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn shape(spec: &WatchSpec) -> Shape<'_> {
    if spec.range_end.is_empty() {
        return Shape::Key(&spec.key);
    }
    // `[key, prefix_end(key))` is exactly "starts with key". An all-0xff key's prefix end is
    // `[0]`, which means "from key on": the same keys.
    if spec.range_end[..] == prefix_end(&spec.key)[..] {
        Shape::Prefix(spec.key.clone())
    } else {
        Shape::Range
    }
}

impl SyncedIndex {
    pub(super) fn insert(&mut self, handle: u64, spec: &WatchSpec) {
        match shape(spec) {
            Shape::Key(key) => {
                self.by_key.entry(key.clone()).or_default().insert(handle);
            }
            Shape::Prefix(prefix) => {
                let len = prefix.len();
                let set = self.by_prefix.entry(prefix).or_default();
                if set.is_empty() {
                    *self.prefix_lengths.entry(len).or_default() += 1;
                }
                set.insert(handle);
            }
            Shape::Range => {
                self.ranges.insert(handle);
            }
        }
    }

    pub(super) fn remove(&mut self, handle: u64, spec: &WatchSpec) {
        match shape(spec) {
            Shape::Key(key) => {
                if let Some(set) = self.by_key.get_mut(key) {
                    set.remove(&handle);
                    if set.is_empty() {
                        self.by_key.remove(key);
                    }
                }
            }
            Shape::Prefix(prefix) => {
                let Some(set) = self.by_prefix.get_mut(&prefix) else {
                    return;
                };
                if !set.remove(&handle) || !set.is_empty() {
                    return;
                }
                self.by_prefix.remove(&prefix);
                if let Some(n) = self.prefix_lengths.get_mut(&prefix.len()) {
                    *n -= 1;
                    if *n == 0 {
                        self.prefix_lengths.remove(&prefix.len());
                    }
                }
            }
            Shape::Range => {
                self.ranges.remove(&handle);
            }
        }
    }

    /// Every watcher that may want an event on `key` (each once).
    pub(super) fn candidates<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        let exact = self.by_key.get(key).into_iter().flatten();
        let prefixed = self
            .prefix_lengths
            .keys()
            .take_while(move |&&len| len <= key.len())
            .filter_map(move |&len| self.by_prefix.get(&key[..len]))
            .flatten();
        exact.chain(prefixed).chain(self.ranges.iter()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &[u8], range_end: &[u8]) -> WatchSpec {
        WatchSpec {
            key: Bytes::copy_from_slice(key),
            range_end: Bytes::copy_from_slice(range_end),
            ..Default::default()
        }
    }

    /// What `Watcher::matches` decides, by brute force over etcd's range rules.
    fn in_range(s: &WatchSpec, key: &[u8]) -> bool {
        if s.range_end.is_empty() {
            return s.key[..] == *key;
        }
        key >= &s.key[..] && (s.range_end[..] == [0] || key < &s.range_end[..])
    }

    #[test]
    fn prefix_ends_are_etcds() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[test]
    fn candidates_include_every_matching_watcher() {
        let keys: Vec<&[u8]> = vec![
            b"",
            b"a",
            b"ab",
            b"abc",
            b"abd",
            b"b",
            b"a\xff",
            b"a\xff\x01",
            b"\xff",
            b"\xff\xff",
            b"\x00",
            b"zz",
        ];
        let mut specs = Vec::new();
        for k in &keys {
            specs.push(spec(k, b""));
            specs.push(spec(k, &prefix_end(k)));
            specs.push(spec(k, b"\x00"));
            specs.push(spec(k, b"b"));
        }
        let mut index = SyncedIndex::default();
        for (h, s) in specs.iter().enumerate() {
            index.insert(h as u64, s);
        }
        for probe in keys
            .iter()
            .chain([b"abcd".as_slice(), b"c", b"a\xff\xff"].iter())
        {
            let found: HashSet<u64> = index.candidates(probe).collect();
            for (h, s) in specs.iter().enumerate() {
                if in_range(s, probe) {
                    assert!(found.contains(&(h as u64)), "{probe:?} misses {s:?}");
                }
            }
            // Prefix and key watchers found are exact; only plain ranges are over-reported.
            let mut seen = HashSet::new();
            assert!(
                index.candidates(probe).all(|h| seen.insert(h)),
                "a watcher twice"
            );
        }
        for (h, s) in specs.iter().enumerate() {
            index.remove(h as u64, s);
        }
        assert!(index.by_key.is_empty() && index.by_prefix.is_empty());
        assert!(index.prefix_lengths.is_empty() && index.ranges.is_empty());
    }
}
