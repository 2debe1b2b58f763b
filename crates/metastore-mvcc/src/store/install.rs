//! Installing a snapshot from the leader: the whole state is replaced by the one in a snapshot
//! file (as `crate::snapshot` writes it), on a follower that fell too far behind to catch up
//! from the leader's log.
//!
//! Crash safety on a persistent engine: the engine is marked (`installing` in the meta space,
//! flushed) before anything is removed, and the mark goes only with the last write of the new
//! state. A member that crashed in between finds the mark at start ([`interrupted_install`])
//! and must finish the install from the same file before it opens the store
//! ([`replace_engine_contents`]), since its engine then holds a mix of two states.

use super::rebuild::rebuild_index;
use super::{read_meta_i64, Store, META_APPLIED, META_COMPACT, META_REVISION};
use crate::MvccError;
use metastore_engine::{Engine, Space, WriteBatch};
use std::path::Path;
use std::sync::atomic::Ordering;

type Result<T> = std::result::Result<T, MvccError>;

/// Present in the meta space while an install is under way: the raft index of its snapshot.
const META_INSTALLING: &[u8] = b"installing";

/// The raft index of a snapshot install that a crash interrupted, if any.
pub fn interrupted_install(engine: &dyn Engine) -> Result<Option<u64>> {
    Ok(read_meta_i64(engine, META_INSTALLING)?.map(|i| i as u64))
}

/// Replaces everything `engine` holds with the snapshot at `path` (taken at raft `index`), in
/// bounded batches; on a persistent engine the result is flushed before this returns. The
/// caller keeps readers and writers away meanwhile.
pub fn replace_engine_contents(engine: &dyn Engine, path: &Path, index: u64) -> Result<()> {
    let mark = |batch: &mut WriteBatch| {
        batch.put(
            Space::Meta,
            META_INSTALLING.to_vec(),
            (index as i64).to_be_bytes().to_vec(),
        )
    };
    if engine.is_persistent() {
        let mut batch = WriteBatch::new();
        mark(&mut batch);
        engine.write(batch)?;
        engine.persist()?;
    }
    engine.clear_space(Space::Kv, &[])?;
    engine.clear_space(Space::Meta, &[META_INSTALLING])?;
    crate::snapshot::load_snapshot(engine, path)?;
    let loaded = read_meta_i64(engine, META_APPLIED)?.unwrap_or(0) as u64;
    if loaded != index {
        // The file names another index than the one raft installs: its state would be
        // recorded under the wrong index and entries replayed onto it twice or never.
        return Err(MvccError::Engine(format!(
            "snapshot {} holds raft index {loaded}, expected {index}",
            path.display()
        )));
    }
    if engine.is_persistent() {
        let mut batch = WriteBatch::new();
        batch.delete(Space::Meta, META_INSTALLING.to_vec());
        engine.write(batch)?;
        engine.persist()?;
    }
    Ok(())
}

impl<E: Engine> Store<E> {
    /// Replaces the whole state with the leader's snapshot at `path`, taken at raft `index`:
    /// the engine's contents, the key index, revisions, leases, alarms, cluster version and
    /// member attributes; every watcher then catches up from the new state. Reads wait while
    /// it runs (they never see half of it). Called by the apply loop, between entries.
    pub fn install_snapshot(&self, path: &Path, index: u64) -> Result<()> {
        let _writer = self.writer.lock();
        let _gate = self.install_gate.write();
        // Records a running capture still reads belong to the old state, which is going away
        // whole: nothing deferred is kept for it.
        self.deferred_deletes.lock().clear();
        replace_engine_contents(self.engine.as_ref(), path, index)?;
        self.reload_after_install()?;
        tracing::info!(
            index,
            revision = self.current_revision(),
            keys = self.index.len(),
            "installed the leader's snapshot"
        );
        Ok(())
    }

    fn reload_after_install(&self) -> Result<()> {
        let engine = self.engine.as_ref();
        self.index.clear();
        let max_rev = rebuild_index(engine, &self.index)?;
        let revision = read_meta_i64(engine, META_REVISION)?
            .unwrap_or(1)
            .max(max_rev);
        let compact = read_meta_i64(engine, META_COMPACT)?.unwrap_or(-1);
        let applied = read_meta_i64(engine, META_APPLIED)?.unwrap_or(0) as u64;
        *self.cluster_version.write() =
            super::cluster_version::load(engine, super::ClusterVersion::this_build())?;
        self.members.reload(engine)?;
        self.auth.reload(engine)?;
        self.alarms.write().clear();
        self.load_alarms()?;
        self.compact_rev.store(compact, Ordering::SeqCst);
        // The leader's capture may hold records its compaction had not dropped yet.
        self.restart_compaction(compact)?;
        self.current_rev.store(revision, Ordering::Release);
        self.applied_index.store(applied, Ordering::Release);
        self.leases.clear();
        self.load_leases()?;
        self.hub.resync_all(revision);
        Ok(())
    }
}
