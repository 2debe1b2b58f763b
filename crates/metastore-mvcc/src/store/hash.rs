//! `Maintenance.Hash` and `HashKV`: checksums that let operators (and the robustness tests)
//! prove that members hold the same state.
//!
//! HashKV follows etcd's `hashByRev`: CRC-32C over the bucket name `key`, then, in revision
//! order, each MVCC record's revision key in etcd's bbolt layout (8-byte big-endian main
//! revision, `_`, 8-byte sub revision, `t` for a tombstone) and its `mvccpb.KeyValue` bytes, for
//! the records up to the requested revision; of the records at or below the compact revision
//! only those a compaction at that revision keeps (each key's revision visible there). So two
//! members agree exactly when their histories since the compaction agree, whatever each one's
//! physical compaction has got to.

use super::{parse_rev_key, Store};
use crate::snapshot::ScanHold;
use crate::MvccError;
use metastore_engine::{Engine, Space};
use metastore_proto::mvccpb::KeyValue;
use prost::Message;
use std::ops::Bound;

type Result<T> = std::result::Result<T, MvccError>;

/// What HashKV reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The compact revision when the hash began.
    pub compact_revision: i64,
    /// The store's revision when the hash began (the response header's).
    pub current_revision: i64,
}

/// etcd's revision key layout in bbolt: `main '_' sub`, `t` appended for a tombstone.
fn etcd_rev_key(main: i64, sub: i64, tombstone: bool, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&main.to_be_bytes());
    out.push(b'_');
    out.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        out.push(b't');
    }
}

/// CRC-32C, the Castagnoli polynomial etcd hashes with.
const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

impl<E: Engine> Store<E> {
    /// etcd's HashKV at `revision` (0 = the current one).
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash> {
        let _gate = self.install_gate.read();
        let (_hold, compact, current) = self.hold_records();
        if revision > 0 && revision <= compact {
            return Err(MvccError::Compacted);
        }
        if revision > current {
            return Err(MvccError::FutureRev);
        }
        let at = if revision <= 0 { current } else { revision };
        let mut digest = CASTAGNOLI.digest();
        digest.update(b"key");
        self.hash_records(at, compact, &mut digest)?;
        Ok(KvHash {
            hash: digest.finalize(),
            compact_revision: compact,
            current_revision: current,
        })
    }

    /// etcd's Hash (documented there as for testing): a CRC-32C over what members replicate:
    /// the MVCC records as HashKV takes them at the current revision, then the replicated
    /// metadata (leases, alarms, revisions, cluster version, member attributes). The applied
    /// raft index is left out, as etcd leaves out its consistent index: members reach the same
    /// state at different indexes (an election's empty entry, a membership change).
    pub fn hash_all(&self) -> Result<(u32, i64)> {
        let _gate = self.install_gate.read();
        let (_hold, compact, current) = self.hold_records();
        let mut digest = CASTAGNOLI.digest();
        digest.update(b"key");
        self.hash_records(current, compact, &mut digest)?;
        digest.update(b"meta");
        self.engine.scan(
            Space::Meta,
            (Bound::Unbounded, Bound::Unbounded),
            &mut |k, v| {
                if k != super::META_APPLIED && k != b"installing" {
                    digest.update(k);
                    digest.update(v);
                }
                true
            },
        )?;
        Ok((digest.finalize(), current))
    }

    /// Keeps physical compaction from deleting records until the hold is dropped. Taken under
    /// the writer lock, so the revisions read belong together; a compaction may still be
    /// between two steps, which the hash does not see: it keeps records by what the index says
    /// is visible, not by what is left in the engine.
    fn hold_records(&self) -> (ScanHold, i64, i64) {
        let _writer = self.writer.lock();
        (
            ScanHold::new(self.snapshot_scan.clone()),
            self.compact_revision(),
            self.current_revision(),
        )
    }

    fn hash_records(&self, at: i64, compact: i64, digest: &mut crc::Digest<'_, u32>) -> Result<()> {
        let upper = at.saturating_add(1).to_be_bytes();
        let mut key_buf = Vec::with_capacity(18);
        let mut failure = None;
        self.engine.scan_bulk(
            Space::Kv,
            (Bound::Unbounded, Bound::Excluded(&upper[..])),
            &mut |k, v| {
                let Some((rev, tombstone)) = parse_rev_key(k) else {
                    failure = Some(MvccError::Corrupt(0, format!("bad revision key {k:?}")));
                    return false;
                };
                if rev.main <= compact {
                    let kv = match KeyValue::decode(&v[..]) {
                        Ok(kv) => kv,
                        Err(e) => {
                            failure = Some(MvccError::Corrupt(rev.main, e.to_string()));
                            return false;
                        }
                    };
                    // What a compaction at `compact` keeps of this key: its revision visible
                    // at `at` if that is this record (records a compaction deferred are skipped
                    // like the ones it already deleted).
                    let kept = !tombstone
                        && self
                            .index
                            .get(&kv.key, at)
                            .is_some_and(|visible| visible.rev == rev);
                    if !kept {
                        return true;
                    }
                }
                etcd_rev_key(rev.main, rev.sub, tombstone, &mut key_buf);
                digest.update(&key_buf);
                digest.update(v);
                true
            },
        )?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
