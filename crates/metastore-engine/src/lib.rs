//! The engine trait: an ordered byte-key store with a few key spaces and atomic write batches.
//!
//! Engines know nothing of MVCC, Raft or etcd. The state machine (`metastore-mvcc`) encodes its
//! revisions and metadata into keys of these spaces.

use bytes::Bytes;
use std::ops::Bound;

/// Separate key spaces (column families in RocksDB terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// Revision-keyed MVCC records.
    Kv,
    /// Small bookkeeping values: applied index, revisions, …
    Meta,
}

impl Space {
    pub const ALL: [Space; 2] = [Space::Kv, Space::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Space::Kv => "kv",
            Space::Meta => "meta",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine i/o error: {0}")]
    Io(String),
    #[error("engine corruption: {0}")]
    Corruption(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        space: Space,
        key: Bytes,
        value: Bytes,
    },
    Delete {
        space: Space,
        key: Bytes,
    },
}

/// Writes applied together: on a crash either all or none of them survive (for engines that
/// persist), and one batch is written per applied raft batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, space: Space, key: impl Into<Bytes>, value: impl Into<Bytes>) {
        self.ops.push(WriteOp::Put {
            space,
            key: key.into(),
            value: value.into(),
        });
    }

    pub fn delete(&mut self, space: Space, key: impl Into<Bytes>) {
        self.ops.push(WriteOp::Delete {
            space,
            key: key.into(),
        });
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }
}

/// An ordered key-value engine. Reads may run concurrently with one writer.
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `rocksdb`).
    fn name(&self) -> &'static str;

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>>;

    /// [`get`](Self::get) of several keys, answered in their order: an engine that can batch
    /// lookups pays its per-lookup cost once.
    fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        keys.iter().map(|k| self.get(space, k)).collect()
    }

    /// Visits keys in `range` in ascending order until `visit` returns false.
    fn scan(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()>;

    /// [`scan`](Self::scan) for reads of a whole space or most of it (snapshots, hashes, the
    /// index rebuild): an engine with a cache leaves it as it is.
    fn scan_bulk(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()> {
        self.scan(space, range, visit)
    }

    /// [`scan_bulk`](Self::scan_bulk) lending each value as a slice, for a reader that keeps
    /// little of it (the key index rebuild at start reads four small fields of every record):
    /// an engine that would copy each value into `Bytes` need not.
    fn scan_bulk_borrowed(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.scan_bulk(space, range, &mut |k, v| visit(k, v))
    }

    /// Applies a batch.
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// Approximate bytes held (keys + values), for status and quotas.
    fn size_bytes(&self) -> u64;

    /// Whether data written survives a process restart without replaying the raft log.
    fn is_persistent(&self) -> bool;

    /// Makes everything written so far durable (a persistent engine flushes; the memory engine
    /// has nothing to do). The raft WAL below the applied index of the flushed state may then be
    /// purged.
    fn persist(&self) -> Result<()> {
        Ok(())
    }

    /// Deletes every key of `space` except `keep`, in bounded batches (memory stays bounded
    /// whatever the space holds). Not atomic: callers that need a crash to leave a known state
    /// mark the operation themselves (see the MVCC store's snapshot install).
    fn clear_space(&self, space: Space, keep: &[&[u8]]) -> Result<()> {
        const CHUNK: usize = 10_000;
        let mut after: Option<Bytes> = None;
        loop {
            let mut keys: Vec<Bytes> = Vec::with_capacity(CHUNK);
            let lower = match &after {
                Some(k) => Bound::Excluded(&k[..]),
                None => Bound::Unbounded,
            };
            self.scan(space, (lower, Bound::Unbounded), &mut |k, _| {
                keys.push(Bytes::copy_from_slice(k));
                keys.len() < CHUNK
            })?;
            let Some(last) = keys.last().cloned() else {
                return Ok(());
            };
            let full = keys.len() == CHUNK;
            let mut batch = WriteBatch::new();
            for k in keys {
                if !keep.contains(&&k[..]) {
                    batch.delete(space, k);
                }
            }
            self.write(batch)?;
            if !full {
                return Ok(());
            }
            after = Some(last);
        }
    }

    /// Reclaims space (etcd's Defragment). Returns false when the engine has nothing to do.
    fn defragment(&self) -> Result<bool> {
        Ok(false)
    }
}
