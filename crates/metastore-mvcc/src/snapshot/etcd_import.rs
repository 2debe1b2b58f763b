//! Reading an etcd backend file (one `etcdctl snapshot save` wrote, against etcd or MetaStore)
//! into an empty engine: what `metastore snapshot restore` builds a data dir from.
//!
//! What comes over: every MVCC record of the `key` bucket (etcd's 17-byte revisions become our
//! 16-byte ones, the `mvccpb.KeyValue` value is kept as is), the revision and the compaction
//! point, the leases (`leasepb.Lease` has our lease record's fields and numbers), and the auth
//! buckets (users, roles, whether auth is on) kept as etcd encodes them. What does not: raft's
//! consistent index and term (a restored member starts a new raft log, as etcd's restore does),
//! the members (the restore's flags name the new ones) and the alarms (raised by members that
//! are gone).

use crate::store::{META_APPLIED, META_COMPACT, META_REVISION};
use crate::MvccError;
use metastore_bbolt::{BoltError, BoltReader};
use metastore_engine::{Engine, Space, WriteBatch};
use metastore_proto::internal::LeaseRecord;
use metastore_proto::mvccpb::KeyValue;
use prost::Message;
use std::path::Path;

/// Meta keys of what the auth buckets held, as etcd stores them: `auth_user/<name>` is an
/// `authpb.User`, `auth_role/<name>` an `authpb.Role`; `auth_enabled` is one byte (1 = on) and
/// `auth_revision` 8 bytes big-endian.
pub const AUTH_USER_PREFIX: &[u8] = b"auth_user/";
pub const AUTH_ROLE_PREFIX: &[u8] = b"auth_role/";
pub const AUTH_ENABLED: &[u8] = b"auth_enabled";
pub const AUTH_REVISION: &[u8] = b"auth_revision";

/// Records or bytes written to the engine in one batch: memory stays bounded whatever the
/// file's size.
const BATCH_RECORDS: usize = 10_000;
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// What `etcdutl snapshot restore`'s `--bump-revision` and `--mark-compacted` do.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// Added to the latest revision: clients that watched the old cluster and resume from a
    /// revision they saw never miss a change made after the restore.
    pub bump_revision: i64,
    /// Marks the (bumped) latest revision compacted: such watchers are told to start over
    /// instead of being served a history that did not happen.
    pub mark_compacted: bool,
}

/// What an import brought over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// The revision the restored member serves.
    pub revision: i64,
    /// The compaction point (0: never compacted).
    pub compact_revision: i64,
    /// MVCC records (each version of each key, tombstones included).
    pub records: u64,
    pub leases: u64,
    pub users: u64,
    pub roles: u64,
    pub auth_enabled: bool,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> MvccError {
    MvccError::Engine(format!("etcd backup file {}: {what}", path.display()))
}

/// etcd's revision bytes (main, `_`, sub, `t` for a tombstone) as our MVCC key.
fn our_rev_key(k: &[u8]) -> Option<(i64, Vec<u8>)> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[..8].try_into().ok()?);
    let mut out = Vec::with_capacity(17);
    out.extend_from_slice(&k[..8]);
    out.extend_from_slice(&k[9..17]);
    if tombstone {
        out.push(b't');
    }
    Some((main, out))
}

/// The main revision of etcd's 17-byte revision (a compaction point).
fn main_of(v: &[u8]) -> Option<i64> {
    (v.len() >= 8).then(|| i64::from_be_bytes(v[..8].try_into().unwrap_or_default()))
}

struct Batcher<'a> {
    engine: &'a dyn Engine,
    batch: WriteBatch,
    bytes: usize,
}

impl Batcher<'_> {
    fn put(&mut self, space: Space, k: Vec<u8>, v: Vec<u8>) -> Result<(), MvccError> {
        self.bytes += k.len() + v.len();
        self.batch.put(space, k, v);
        if self.batch.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MvccError> {
        self.bytes = 0;
        Ok(self.engine.write(std::mem::take(&mut self.batch))?)
    }
}

/// Reads the etcd backend file at `path` into `engine`, which must be empty. The engine then
/// holds a state machine at raft index 0: a new cluster's bootstrap entries follow it.
pub fn import_etcd_backend(
    engine: &dyn Engine,
    path: &Path,
    options: ImportOptions,
) -> Result<ImportSummary, MvccError> {
    let bolt = |e: BoltError| corrupt(path, e);
    let reader = BoltReader::open(path).map_err(bolt)?;
    let names = reader.bucket_names().map_err(bolt)?;
    if !names.iter().any(|n| n == b"key") || !names.iter().any(|n| n == b"meta") {
        return Err(corrupt(
            path,
            "no `key` and `meta` buckets: not an etcd backend",
        ));
    }
    let mut out = Batcher {
        engine,
        batch: WriteBatch::new(),
        bytes: 0,
    };
    let mut summary = ImportSummary::default();
    let mut failure: Option<MvccError> = None;
    let mut latest = 0i64;
    reader
        .for_each(b"key", &mut |k, v| {
            let Some((main, key)) = our_rev_key(k) else {
                failure = Some(corrupt(
                    path,
                    format!("bad revision key {k:?} in bucket `key`"),
                ));
                return Ok(false);
            };
            if let Err(e) = KeyValue::decode(v) {
                failure = Some(corrupt(path, format!("revision {main}: {e}")));
                return Ok(false);
            }
            latest = latest.max(main);
            summary.records += 1;
            if let Err(e) = out.put(Space::Kv, key, v.to_vec()) {
                failure = Some(e);
                return Ok(false);
            }
            Ok(true)
        })
        .map_err(bolt)?;
    if let Some(e) = failure.take() {
        return Err(e);
    }

    let (mut scheduled, mut finished) = (0i64, 0i64);
    reader
        .for_each(b"meta", &mut |k, v| {
            match k {
                b"scheduledCompactRev" => scheduled = main_of(v).unwrap_or(0),
                b"finishedCompactRev" => finished = main_of(v).unwrap_or(0),
                _ => {}
            }
            Ok(true)
        })
        .map_err(bolt)?;
    // A compaction etcd had scheduled but not finished is finished when the store opens.
    let mut compact = scheduled.max(finished);
    // etcd's restore: the revision is the newest record's, never below the compaction point.
    let mut revision = latest.max(compact).max(1);
    if options.bump_revision > 0 {
        revision = revision.saturating_add(options.bump_revision);
    }
    if options.mark_compacted {
        compact = revision;
    }

    reader
        .for_each(b"lease", &mut |k, v| {
            let record = match LeaseRecord::decode(v) {
                Ok(r)
                    if k.len() == 8
                        && r.id == i64::from_be_bytes(k.try_into().unwrap_or_default()) =>
                {
                    r
                }
                Ok(_) => {
                    failure = Some(corrupt(
                        path,
                        format!("lease key {k:?} does not match its record"),
                    ));
                    return Ok(false);
                }
                Err(e) => {
                    failure = Some(corrupt(path, format!("lease {k:?}: {e}")));
                    return Ok(false);
                }
            };
            summary.leases += 1;
            if let Err(e) = out.put(
                Space::Meta,
                crate::lease::lease_meta_key(record.id),
                record.encode_to_vec(),
            ) {
                failure = Some(e);
                return Ok(false);
            }
            Ok(true)
        })
        .map_err(bolt)?;
    if let Some(e) = failure.take() {
        return Err(e);
    }

    for (bucket, prefix, count) in [
        (&b"authUsers"[..], AUTH_USER_PREFIX, &mut summary.users),
        (&b"authRoles"[..], AUTH_ROLE_PREFIX, &mut summary.roles),
    ] {
        reader
            .for_each(bucket, &mut |k, v| {
                *count += 1;
                if let Err(e) = out.put(Space::Meta, [prefix, k].concat(), v.to_vec()) {
                    failure = Some(e);
                    return Ok(false);
                }
                Ok(true)
            })
            .map_err(bolt)?;
        if let Some(e) = failure.take() {
            return Err(e);
        }
    }
    let mut auth: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    reader
        .for_each(b"auth", &mut |k, v| {
            match k {
                b"authEnabled" => auth.push((AUTH_ENABLED.to_vec(), v.to_vec())),
                b"authRevision" => auth.push((AUTH_REVISION.to_vec(), v.to_vec())),
                _ => {}
            }
            Ok(true)
        })
        .map_err(bolt)?;
    for (k, v) in auth {
        if k == AUTH_ENABLED {
            summary.auth_enabled = v.first() == Some(&1);
        }
        out.put(Space::Meta, k, v)?;
    }

    out.put(
        Space::Meta,
        META_REVISION.to_vec(),
        revision.to_be_bytes().to_vec(),
    )?;
    if compact > 0 {
        out.put(
            Space::Meta,
            META_COMPACT.to_vec(),
            compact.to_be_bytes().to_vec(),
        )?;
    }
    out.put(
        Space::Meta,
        META_APPLIED.to_vec(),
        0u64.to_be_bytes().to_vec(),
    )?;
    out.flush()?;
    summary.revision = revision;
    summary.compact_revision = compact;
    Ok(summary)
}
