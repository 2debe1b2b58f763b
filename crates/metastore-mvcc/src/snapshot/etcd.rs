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
//! - `auth`, `authUsers`, `authRoles`: what a restore from etcd brought over (etcd's own
//!   encoding, kept as is); empty otherwise.
//! - `cluster`: `clusterVersion`; `alarm`, `members`, `members_removed` empty (a restore
//!   writes the new members itself).

use super::etcd_import::{AUTH_ENABLED, AUTH_REVISION, AUTH_ROLE_PREFIX, AUTH_USER_PREFIX};
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

        // Pairs in byte order within each bucket, as bbolt wants them (buckets in any order).
        db.begin_bucket(b"alarm").map_err(bolt_err)?;
        db.end_bucket().map_err(bolt_err)?;
        // The auth buckets as a restore from etcd brought them (see `etcd_import`).
        db.begin_bucket(b"auth").map_err(bolt_err)?;
        for (ours, etcds) in [
            (AUTH_ENABLED, &b"authEnabled"[..]),
            (AUTH_REVISION, &b"authRevision"[..]),
        ] {
            if let Some((_, v)) = self.meta.iter().find(|(k, _)| k.as_ref() == ours) {
                db.put(etcds, v).map_err(bolt_err)?;
            }
        }
        db.end_bucket().map_err(bolt_err)?;
        for (bucket, prefix) in [
            (&b"authRoles"[..], AUTH_ROLE_PREFIX),
            (&b"authUsers"[..], AUTH_USER_PREFIX),
        ] {
            db.begin_bucket(bucket).map_err(bolt_err)?;
            for (k, v) in &self.meta {
                if let Some(name) = k.strip_prefix(prefix) {
                    db.put(name, v).map_err(bolt_err)?;
                }
            }
            db.end_bucket().map_err(bolt_err)?;
        }
        for name in [&b"members"[..], b"members_removed"] {
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
        engine.scan_bulk(Space::Kv, (Bound::Unbounded, end), &mut |k, v| {
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

/// What `etcdctl snapshot status` reports of an etcd backend file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EtcdBackendStatus {
    /// CRC-32C over every bucket's name, keys and values, in order (etcd's status hash).
    pub hash: u32,
    /// The main revision of the last record of the `key` bucket.
    pub revision: i64,
    /// Pairs in all buckets.
    pub total_key: u64,
    /// The database's size in pages, in bytes.
    pub total_size: u64,
}

/// Reads an etcd backend file (one from `etcdctl snapshot save`, against etcd or MetaStore) as
/// etcd's `snapshot status` does; a file ending in the SHA-256 `snapshot save` appends is read
/// without it.
pub fn etcd_backend_status(path: &std::path::Path) -> Result<EtcdBackendStatus, MvccError> {
    let io = |e: BoltError| MvccError::Engine(format!("{}: {e}", path.display()));
    let reader = metastore_bbolt::BoltReader::open(path).map_err(io)?;
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut digest = crc.digest();
    let mut status = EtcdBackendStatus {
        hash: 0,
        revision: 0,
        total_key: 0,
        total_size: reader.size(),
    };
    for name in reader.bucket_names().map_err(io)? {
        digest.update(&name);
        let is_key = name == b"key";
        reader
            .for_each(&name, &mut |k, v| {
                digest.update(k);
                digest.update(v);
                if is_key {
                    if let Some(main) = k.get(..8).and_then(|m| <[u8; 8]>::try_from(m).ok()) {
                        status.revision = i64::from_be_bytes(main);
                    }
                }
                status.total_key += 1;
                Ok(true)
            })
            .map_err(io)?;
    }
    status.hash = digest.finalize();
    Ok(status)
}
