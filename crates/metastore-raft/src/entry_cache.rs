//! Sizes of the entries in raft's in-memory log, so that it can be bounded by bytes.

use raft::eraftpb::Entry;

/// The sizes of the entries in the in-memory log, so that it can be bounded by bytes as well as
/// by count: a few large entries must not hold gigabytes for a follower that may never ask.
#[derive(Default)]
pub(crate) struct EntryCache {
    pub(crate) sizes: std::collections::VecDeque<(u64, u64)>,
    pub(crate) bytes: u64,
}

impl EntryCache {
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        // A new leader's entries replace this member's tail from `first` on.
        while self.sizes.back().is_some_and(|(i, _)| *i >= first) {
            if let Some((_, size)) = self.sizes.pop_back() {
                self.bytes -= size;
            }
        }
        for e in entries {
            // The payload plus raft's own fields, roughly.
            let size = (e.data.len() + e.context.len() + 32) as u64;
            self.sizes.push_back((e.index, size));
            self.bytes += size;
        }
    }

    pub(crate) fn trim_below(&mut self, index: u64) {
        while self.sizes.front().is_some_and(|(i, _)| *i < index) {
            if let Some((_, size)) = self.sizes.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The first index to keep so that at most `limit` bytes stay, never above `applied + 1`.
    pub(crate) fn keep_from(&self, limit: u64, applied: u64) -> u64 {
        let mut remaining = self.bytes;
        for (index, size) in &self.sizes {
            if remaining <= limit || *index > applied {
                return *index;
            }
            remaining -= size;
        }
        applied + 1
    }
}
