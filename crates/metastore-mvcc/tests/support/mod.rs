//! The engine the MVCC suites run on: `METASTORE_TEST_ENGINE=rocksdb` runs the same tests on
//! RocksDB (in a temporary directory) instead of the memory engine.

#![allow(dead_code)]

use bytes::Bytes;
use metastore_engine::{Engine, Result, Space, WriteBatch};
use metastore_memory::MemoryEngine;
use metastore_rocksdb::{RocksDbConfig, RocksDbEngine};
use std::ops::Bound;

pub enum TestEngine {
    Memory(Box<MemoryEngine>),
    RocksDb(RocksDbEngine, tempfile::TempDir),
}

impl TestEngine {
    /// The engine named by `METASTORE_TEST_ENGINE` (default: memory).
    pub fn from_env() -> Self {
        match std::env::var("METASTORE_TEST_ENGINE").as_deref() {
            Ok("rocksdb") => Self::rocksdb(),
            _ => Self::memory(),
        }
    }

    pub fn memory() -> Self {
        TestEngine::Memory(Box::new(MemoryEngine::new()))
    }

    pub fn rocksdb() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RocksDbConfig {
            // Small caches: tests open many engines.
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            ..Default::default()
        };
        let engine = RocksDbEngine::open(dir.path(), &config).expect("open rocksdb");
        TestEngine::RocksDb(engine, dir)
    }

    fn inner(&self) -> &dyn Engine {
        match self {
            TestEngine::Memory(e) => e.as_ref(),
            TestEngine::RocksDb(e, _) => e,
        }
    }
}

impl Engine for TestEngine {
    fn name(&self) -> &'static str {
        self.inner().name()
    }
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner().get(space, key)
    }
    fn scan(
        &self,
        space: Space,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> Result<()> {
        self.inner().scan(space, range, visit)
    }
    fn write(&self, batch: WriteBatch) -> Result<()> {
        self.inner().write(batch)
    }
    fn size_bytes(&self) -> u64 {
        self.inner().size_bytes()
    }
    fn is_persistent(&self) -> bool {
        self.inner().is_persistent()
    }
    fn persist(&self) -> Result<()> {
        self.inner().persist()
    }
    fn defragment(&self) -> Result<bool> {
        self.inner().defragment()
    }
}
