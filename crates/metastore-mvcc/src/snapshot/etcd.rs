//! The captured state written as etcd's backend: a bbolt file with etcd 3.5's buckets, so that
//! `etcdctl snapshot save` takes it, and etcd's `snapshot status` and `snapshot restore` (and
//! an etcd started on the restored data dir) read it.
//!
//! - `key`: every MVCC record, keyed as etcd keys revisions (8-byte big-endian main revision,
//!   `_`, 8-byte sub revision, `t` for a tombstone); the value is the `mvccpb.KeyValue` the
//!   record already is.
//! - `meta`: `consistent_index` (the applied raft index), `term`, and the compaction revisions
//!   (`scheduledCompactRev` / `finishedCompactRev`, as etcd's 17-byte revisions).
//! - `lease`: one `leasepb.Lease` per lease, keyed by its 8-byte big-endian id (our lease
//!   record has the same fields and numbers).
//! - `cluster`: `clusterVersion`; `alarm`, `auth`, `authUsers`, `authRoles`, `members`,
//!   `members_removed` (restore writes the new members itself).

use super::SnapshotCapture;
use crate::MvccError;
use metastore_bbolt::{BoltError, BoltWriter};
use metastore_engine::Engine;
use metastore_engine::Space;
use std::fs::File;
use std::ops::Bound;

fn bolt_err(e: BoltError) -> MvccError {
    MvccError::Engine(format!("etcd backup file: {e}"))
}

/// etcd's revision bytes: main, `_`, sub (and `t` for a tombstone).
fn etcd_revision(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

impl SnapshotCapture {
    /// Writes the captured state as an etcd backend file into `file` (from its start) and
    /// returns its length. `term` is the raft term recorded beside the applied index.
    pub fn write_etcd_backend(
        self,
        engine: &dyn Engine,
        file: &mut File,
        term: u64,
    ) -> Result<u64, MvccError> {
        let mut db = BoltWriter::new(&mut *file).map_err(bolt_err)?;
        let meta_value = |name: &[u8]| {
            self.meta
                .iter()
                .find(|(k, _)| k.as_ref() == name)
                .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_ref()).ok())
        };
        let applied = meta_value(crate::store::META_APPLIED).map(u64::from_be_bytes);
        let compact = meta_value(crate::store::META_COMPACT).map(i64::from_be_bytes);

        let empty: &[&[u8]] = &[
            b"alarm",
            b"auth",
            b"authRoles",
            b"authUsers",
            b"members",
            b"members_removed",
        ];
        for name in empty {
            db.begin_bucket(name).map_err(bolt_err)?;
            db.end_bucket().map_err(bolt_err)?;
        }
        db.begin_bucket(b"cluster").map_err(bolt_err)?;
        db.put(b"clusterVersion", b"3.5.0").map_err(bolt_err)?;
        db.end_bucket().map_err(bolt_err)?;

        db.begin_bucket(b"key").map_err(bolt_err)?;
        let end = match &self.kv_end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        let mut failure = None;
        engine.scan(Space::Kv, (Bound::Unbounded, end), &mut |k, v| {
            let Some((rev, tombstone)) = crate::store::parse_rev_key(k) else {
                return true;
            };
            match db.put(&etcd_revision(rev.main, rev.sub, tombstone), v) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(bolt_err(e));
        }
        db.end_bucket().map_err(bolt_err)?;

        db.begin_bucket(b"lease").map_err(bolt_err)?;
        let mut leases: Vec<(&[u8], &[u8])> = self
            .meta
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(crate::lease::LEASE_META_PREFIX)
                    .map(|id| (id, v.as_ref()))
            })
            .collect();
        leases.sort();
        for (id, record) in leases {
            db.put(id, record).map_err(bolt_err)?;
        }
        db.end_bucket().map_err(bolt_err)?;

        db.begin_bucket(b"meta").map_err(bolt_err)?;
        // In byte order, as bbolt wants them.
        db.put(b"consistent_index", &applied.unwrap_or(0).to_be_bytes())
            .map_err(bolt_err)?;
        if let Some(c) = compact.filter(|c| *c > 0) {
            db.put(b"finishedCompactRev", &etcd_revision(c, 0, false))
                .map_err(bolt_err)?;
            db.put(b"scheduledCompactRev", &etcd_revision(c, 0, false))
                .map_err(bolt_err)?;
        }
        db.put(b"term", &term.to_be_bytes()).map_err(bolt_err)?;
        db.end_bucket().map_err(bolt_err)?;

        // The engine is no longer read: compaction may go on while the file is finished.
        drop(self);
        let (_, len) = db.finish().map_err(bolt_err)?;
        file.sync_all()
            .map_err(|e| MvccError::Engine(format!("etcd backup file: {e}")))?;
        Ok(len)
    }
}
