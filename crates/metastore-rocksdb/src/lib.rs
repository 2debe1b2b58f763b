//! The RocksDB engine.
//!
//! - One column family; each key space is a one-byte key prefix. A single memtable means a
//!   flush persists the kv records and the meta records (applied index, revisions) of the same
//!   write batches together, so what survives a crash is always a consistent prefix of the
//!   applied log.
//! - RocksDB's own WAL is off: the raft WAL already made every write durable before it was
//!   applied. After a crash the engine holds the state of its last flush, including the applied
//!   index of that state, and the raft log is replayed from there.
//! - One RocksDB write batch per engine batch (= per applied raft entry).

use bytes::Bytes;
use metastore_engine::{Engine, EngineError, Result, Space, WriteBatch, WriteOp};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, ReadOptions,
    WriteOptions, DB, DEFAULT_COLUMN_FAMILY_NAME,
};
use serde::{Deserialize, Serialize};
use std::ops::Bound;
use std::path::Path;

/// RocksDB tuning, defaults from the performance plans (layer 4).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RocksDbConfig {
    pub block_cache_bytes: usize,
    pub bloom_filter_bits_per_key: f64,
    /// LZ4 on every level but the last.
    pub lz4: bool,
    /// ZSTD on the bottommost level.
    pub zstd_bottommost: bool,
    pub write_buffer_bytes: usize,
    pub max_write_buffer_number: i32,
    pub max_background_compactions: i32,
    pub max_background_flushes: i32,
    pub level0_file_num_compaction_trigger: i32,
    pub level0_slowdown_writes_trigger: i32,
    pub level0_stop_writes_trigger: i32,
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        Self {
            block_cache_bytes: 512 * 1024 * 1024,
            bloom_filter_bits_per_key: 10.0,
            lz4: true,
            zstd_bottommost: true,
            write_buffer_bytes: 128 * 1024 * 1024,
            max_write_buffer_number: 4,
            max_background_compactions: 4,
            max_background_flushes: 2,
            level0_file_num_compaction_trigger: 4,
            level0_slowdown_writes_trigger: 20,
            level0_stop_writes_trigger: 36,
        }
    }
}

pub struct RocksDbEngine {
    db: DB,
    write_opts: WriteOptions,
}

fn io(e: rocksdb::Error) -> EngineError {
    EngineError::Io(e.to_string())
}

fn prefix(space: Space) -> u8 {
    match space {
        Space::Kv => b'k',
        Space::Meta => b'm',
    }
}

fn full_key(space: Space, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(prefix(space));
    k.extend_from_slice(key);
    k
}

impl RocksDbEngine {
    pub fn open(path: impl AsRef<Path>, config: &RocksDbConfig) -> Result<Self> {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(config.block_cache_bytes));
        table.set_bloom_filter(config.bloom_filter_bits_per_key, false);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_block_based_table_factory(&table);
        if config.lz4 {
            opts.set_compression_type(DBCompressionType::Lz4);
        }
        if config.zstd_bottommost {
            opts.set_bottommost_compression_type(DBCompressionType::Zstd);
        }
        opts.set_write_buffer_size(config.write_buffer_bytes);
        opts.set_max_write_buffer_number(config.max_write_buffer_number);
        opts.set_max_background_jobs(
            config.max_background_compactions + config.max_background_flushes,
        );
        opts.set_level_zero_file_num_compaction_trigger(config.level0_file_num_compaction_trigger);
        opts.set_level_zero_slowdown_writes_trigger(config.level0_slowdown_writes_trigger);
        opts.set_level_zero_stop_writes_trigger(config.level0_stop_writes_trigger);
        // Named explicitly (with the same options) so that its handle is kept for MultiGet;
        // `DB::open` opens the same column family without one.
        let default_cf = ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, opts.clone());
        let db = DB::open_cf_descriptors(&opts, path, [default_cf]).map_err(io)?;
        let mut write_opts = WriteOptions::default();
        write_opts.disable_wal(true);
        Ok(Self { db, write_opts })
    }

    /// Compacts the whole key range (etcd's Defragment, for this engine).
    /// A forward scan; `fill_cache: false` for reads of everything (snapshots, hashes, the
    /// index rebuild), which would otherwise push the block cache's working set out and grow it
    /// to its full size. The raw iterator lends key and value out of RocksDB's block (the plain
    /// one boxes a copy of both for every record: two allocations and copies per record, ~18 %
    /// of a restart's index rebuild); a caller that keeps a value copies it.
    fn scan_with(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        fill_cache: bool,
    ) -> Result<()> {
        let p = prefix(space);
        let start = match range.0 {
            Bound::Included(k) | Bound::Excluded(k) => full_key(space, k),
            Bound::Unbounded => vec![p],
        };
        let upper = match range.1 {
            Bound::Included(k) | Bound::Excluded(k) => full_key(space, k),
            Bound::Unbounded => vec![p + 1],
        };
        let mut ro = ReadOptions::default();
        ro.fill_cache(fill_cache);
        ro.set_iterate_upper_bound(upper);
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(&start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let key = &k[1..];
            let skip = matches!(range.0, Bound::Excluded(lo) if key == lo);
            if !skip && !visit(key, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(io)?;
        // The iterator's upper bound is exclusive: an inclusive one is looked up last.
        if let Bound::Included(hi) = range.1 {
            if let Some(v) = self.get(space, hi)? {
                visit(hi, &v);
            }
        }
        Ok(())
    }

    pub fn compact_all(&self) {
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
    }

    fn property(&self, name: &str) -> u64 {
        self.db.property_int_value(name).ok().flatten().unwrap_or(0)
    }
}

impl Engine for RocksDbEngine {
    fn name(&self) -> &'static str {
        "rocksdb"
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .db
            .get(full_key(space, key))
            .map_err(io)?
            .map(Bytes::from))
    }

    /// RocksDB's batched MultiGet: one superversion, and the keys' filter and block lookups
    /// done together, instead of a whole Get per key (a range of 100 keys loads 100 records
    /// scattered by revision).
    fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        let Some(cf) = self.db.cf_handle(DEFAULT_COLUMN_FAMILY_NAME) else {
            return keys.iter().map(|k| self.get(space, k)).collect();
        };
        let full: Vec<Vec<u8>> = keys.iter().map(|k| full_key(space, k)).collect();
        self.db
            .batched_multi_get_cf(cf, &full, false)
            .into_iter()
            .map(|r| {
                r.map(|v| v.map(|slice| Bytes::copy_from_slice(&slice)))
                    .map_err(io)
            })
            .collect()
    }

    fn scan(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()> {
        self.scan_with(
            space,
            range,
            &mut |k, v| visit(k, &Bytes::copy_from_slice(v)),
            true,
        )
    }

    fn scan_bulk(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()> {
        self.scan_with(
            space,
            range,
            &mut |k, v| visit(k, &Bytes::copy_from_slice(v)),
            false,
        )
    }

    fn scan_bulk_borrowed(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.scan_with(space, range, visit, false)
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { space, key, value } => wb.put(full_key(space, &key), &value),
                WriteOp::Delete { space, key } => wb.delete(full_key(space, &key)),
            }
        }
        self.db.write_opt(&wb, &self.write_opts).map_err(io)
    }

    fn size_bytes(&self) -> u64 {
        self.property("rocksdb.total-sst-files-size")
            + self.property("rocksdb.cur-size-all-mem-tables")
    }

    fn is_persistent(&self) -> bool {
        true
    }

    fn persist(&self) -> Result<()> {
        self.db.flush().map_err(io)
    }

    fn defragment(&self) -> Result<bool> {
        self.compact_all();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(
        e: &RocksDbEngine,
        space: Space,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        e.scan(space, (lo, hi), &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .expect("scan");
        out
    }

    #[test]
    fn spaces_are_separate_and_scans_respect_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksDbEngine::open(dir.path(), &RocksDbConfig::default()).expect("open");
        let mut b = WriteBatch::new();
        for k in ["a", "b", "c", "d"] {
            b.put(Space::Kv, k.as_bytes().to_vec(), k.repeat(2).into_bytes());
        }
        b.put(Space::Meta, &b"a"[..], &b"meta"[..]);
        e.write(b).expect("write");
        assert_eq!(
            e.get(Space::Meta, b"a").expect("get").as_deref(),
            Some(&b"meta"[..])
        );
        assert_eq!(
            e.get(Space::Kv, b"a").expect("get").as_deref(),
            Some(&b"aa"[..])
        );
        assert_eq!(
            collect(&e, Space::Kv, Bound::Unbounded, Bound::Unbounded).len(),
            4
        );
        assert_eq!(
            collect(&e, Space::Meta, Bound::Unbounded, Bound::Unbounded),
            vec![b"a".to_vec()]
        );
        assert_eq!(
            collect(&e, Space::Kv, Bound::Excluded(b"a"), Bound::Included(b"c")),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(
            collect(&e, Space::Kv, Bound::Included(b"b"), Bound::Excluded(b"d")),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
    }

    /// The borrowing bulk scan sees what the plain scan sees, for every kind of bound.
    #[test]
    fn borrowed_scan_matches_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksDbEngine::open(dir.path(), &RocksDbConfig::default()).expect("open");
        let mut b = WriteBatch::new();
        for k in ["a", "b", "c", "d"] {
            b.put(Space::Kv, k.as_bytes().to_vec(), k.repeat(3).into_bytes());
        }
        b.put(Space::Meta, &b"b"[..], &b"meta"[..]);
        e.write(b).expect("write");
        type Range<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);
        let bounds: [Range; 4] = [
            (Bound::Unbounded, Bound::Unbounded),
            (Bound::Excluded(b"a"), Bound::Included(b"c")),
            (Bound::Included(b"b"), Bound::Excluded(b"d")),
            (Bound::Excluded(b"b"), Bound::Unbounded),
        ];
        for space in [Space::Kv, Space::Meta] {
            for range in bounds {
                let mut plain = Vec::new();
                e.scan(space, range, &mut |k, v| {
                    plain.push((k.to_vec(), v.to_vec()));
                    true
                })
                .expect("scan");
                let mut lent = Vec::new();
                e.scan_bulk_borrowed(space, range, &mut |k, v| {
                    lent.push((k.to_vec(), v.to_vec()));
                    true
                })
                .expect("borrowed scan");
                assert_eq!(lent, plain, "{range:?}");
            }
        }
    }

    #[test]
    fn flushed_state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let e = RocksDbEngine::open(dir.path(), &RocksDbConfig::default()).expect("open");
            let mut b = WriteBatch::new();
            b.put(Space::Kv, &b"k"[..], &b"v"[..]);
            e.write(b).expect("write");
            e.persist().expect("flush");
        }
        let e = RocksDbEngine::open(dir.path(), &RocksDbConfig::default()).expect("reopen");
        assert_eq!(
            e.get(Space::Kv, b"k").expect("get").as_deref(),
            Some(&b"v"[..])
        );
    }
}
