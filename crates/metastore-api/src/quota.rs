//! The storage size the quota check reads on every write, read from the engine at most every
//! 100 ms: the RocksDB engine answers it from two properties read under the database's
//! mutex, which every write would otherwise contend on. Between reads the estimate adds the
//! bytes of every write checked since, so it only errs high; a write it would refuse is
//! checked again against a fresh read, so nothing is refused (and no NOSPACE alarm raised)
//! on an estimate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const REFRESH: Duration = Duration::from_millis(100);

pub(crate) struct SizeCache {
    started: Instant,
    bytes: AtomicU64,
    /// Milliseconds after `started` when `bytes` was read; u64::MAX before the first read.
    read_at_ms: AtomicU64,
    /// Bytes of the writes checked since `bytes` was read.
    added: AtomicU64,
}

impl Default for SizeCache {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            bytes: AtomicU64::new(0),
            read_at_ms: AtomicU64::new(u64::MAX),
            added: AtomicU64::new(0),
        }
    }
}

impl SizeCache {
    /// The size as of the last read plus what was written since (`adding` included, which
    /// counts from now on); read afresh when the last read is older than the interval.
    pub(crate) fn estimate(&self, read: impl FnOnce() -> u64, adding: u64) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        let at = self.read_at_ms.load(Ordering::Acquire);
        if at == u64::MAX || now.saturating_sub(at) >= REFRESH.as_millis() as u64 {
            self.store(read(), now);
        }
        self.bytes.load(Ordering::Acquire) + self.added.fetch_add(adding, Ordering::AcqRel)
    }

    /// The size read now.
    pub(crate) fn fresh(&self, read: impl FnOnce() -> u64) -> u64 {
        let bytes = read();
        self.store(bytes, self.started.elapsed().as_millis() as u64);
        bytes
    }

    fn store(&self, bytes: u64, now_ms: u64) {
        self.bytes.store(bytes, Ordering::Release);
        self.added.store(0, Ordering::Release);
        self.read_at_ms.store(now_ms, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn reads_at_most_once_per_interval_and_counts_writes_between() {
        let cache = SizeCache::default();
        let reads = Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            1000 * reads.get()
        };
        assert_eq!(cache.estimate(read, 10), 1000);
        assert_eq!(cache.estimate(read, 20), 1010);
        assert_eq!(cache.estimate(read, 0), 1030);
        assert_eq!(reads.get(), 1);
        std::thread::sleep(REFRESH + Duration::from_millis(10));
        assert_eq!(cache.estimate(read, 5), 2000);
        assert_eq!(cache.fresh(read), 3000);
        assert_eq!(cache.estimate(read, 0), 3000);
    }
}
