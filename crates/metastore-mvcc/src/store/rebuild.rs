//! Rebuilding the key index from the engine when a store opens: the whole restart time of a
//! large RocksDB store. The engine scan and the record decoding run on the opening thread; the
//! index inserts (a hash map and a skiplist per new key) run on a second thread fed in batches,
//! so the two halves overlap instead of adding up.

use super::parse_rev_key;
use crate::keyindex::{IndexRev, KeyIndex};
use crate::MvccError;
use bytes::Bytes;
use metastore_engine::{Engine, Space};
use prost::Message;
use std::ops::Bound;
use std::sync::mpsc;

type Result<T> = std::result::Result<T, MvccError>;

/// Records handed to the index thread at a time: large enough that the channel costs nothing
/// per record, small enough that both threads start at once.
const BATCH: usize = 4096;
/// Batches in flight: the scan may run this far ahead of the inserts.
const BATCHES_IN_FLIGHT: usize = 8;

/// The fields of a stored `KeyValue` the key index needs: decoding into this skips the value
/// (tag 5) and mod revision (tag 3) without copying them.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct IndexFields {
    #[prost(bytes = "bytes", tag = "1")]
    pub(super) key: Bytes,
    #[prost(int64, tag = "2")]
    pub(super) create_revision: i64,
    #[prost(int64, tag = "4")]
    pub(super) version: i64,
    #[prost(int64, tag = "6")]
    pub(super) lease: i64,
}

/// Fills `index` from every MVCC record the engine holds; returns the highest main revision.
pub(super) fn rebuild_index(engine: &dyn Engine, index: &KeyIndex) -> Result<i64> {
    std::thread::scope(|scope| {
        let (batches, received) = mpsc::sync_channel::<Vec<(Bytes, IndexRev)>>(BATCHES_IN_FLIGHT);
        let inserter = std::thread::Builder::new()
            .name("index-rebuild".into())
            .spawn_scoped(scope, move || {
                for batch in received {
                    for (key, entry) in batch {
                        index.push_owned(key, entry);
                    }
                }
            })
            .map_err(|e| MvccError::Thread("index-rebuild", e.to_string()))?;
        let scanned = scan(engine, batches);
        // The inserter ends once the scan drops its sender; a panic there is a bug that must
        // stop the process, not leave a half-built index.
        if let Err(panic) = inserter.join() {
            std::panic::resume_unwind(panic);
        }
        scanned
    })
}

/// Decodes every record in revision order and sends it on in batches.
fn scan(engine: &dyn Engine, batches: mpsc::SyncSender<Vec<(Bytes, IndexRev)>>) -> Result<i64> {
    let mut max_rev = 1i64;
    let mut err = None;
    let mut batch = Vec::with_capacity(BATCH);
    engine.scan_bulk_borrowed(
        Space::Kv,
        (Bound::Unbounded, Bound::Unbounded),
        &mut |k, v| {
            let Some((rev, tombstone)) = parse_rev_key(k) else {
                err = Some(MvccError::Corrupt(0, format!("bad revision key {k:?}")));
                return false;
            };
            let kv = match IndexFields::decode(v) {
                Ok(kv) => kv,
                Err(e) => {
                    err = Some(MvccError::Corrupt(rev.main, e.to_string()));
                    return false;
                }
            };
            let entry = if tombstone {
                IndexRev::tombstone(rev)
            } else {
                IndexRev::live(rev, kv.create_revision, kv.version, kv.lease)
            };
            max_rev = max_rev.max(rev.main);
            batch.push((kv.key, entry));
            if batch.len() == BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                // The inserter only stops early by panicking, which join reports.
                return batches.send(full).is_ok();
            }
            true
        },
    )?;
    if !batch.is_empty() {
        let _ = batches.send(batch);
    }
    match err {
        Some(e) => Err(e),
        None => Ok(max_rev),
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;
    use metastore_memory::MemoryEngine;
    use metastore_proto::etcdserverpb::{
        DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest,
    };
    use metastore_proto::internal::{command::Op, Command};
    use std::sync::Arc;

    fn command(op: Op) -> Command {
        Command {
            auth: None,
            op: Some(op),
        }
    }

    fn all_keys_at(store: &Store<MemoryEngine>, revision: i64) -> Vec<(Vec<u8>, i64, i64, i64)> {
        let resp = store
            .range(&RangeRequest {
                key: vec![0].into(),
                range_end: vec![0].into(),
                revision,
                ..Default::default()
            })
            .expect("range");
        resp.kvs
            .iter()
            .map(|kv| {
                (
                    kv.key.to_vec(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                )
            })
            .collect()
    }

    /// More records than several batches of the inserter thread, with keys written again and
    /// deleted: a reopened store answers at every revision as the one that wrote them.
    #[test]
    fn a_reopened_store_rebuilds_the_same_index_across_many_batches() {
        const KEYS: usize = 3 * super::BATCH + 17;
        let engine = Arc::new(MemoryEngine::new());
        let store = Store::open(engine.clone()).expect("open");
        let put = |i: usize, round: usize| {
            command(Op::Put(PutRequest {
                key: format!("key-{i:06}").into_bytes().into(),
                value: format!("value {round}").into_bytes().into(),
                ..Default::default()
            }))
        };
        let mut index = 0;
        let mut apply = |cmds: Vec<Command>| {
            index += 1;
            store.apply(index, &cmds).expect("apply");
        };
        apply((0..KEYS).map(|i| put(i, 0)).collect());
        let after_first = store.current_revision();
        apply((0..KEYS).step_by(3).map(|i| put(i, 1)).collect());
        apply(
            (0..KEYS)
                .step_by(5)
                .map(|i| {
                    command(Op::DeleteRange(DeleteRangeRequest {
                        key: format!("key-{i:06}").into_bytes().into(),
                        ..Default::default()
                    }))
                })
                .collect(),
        );
        let after_deletes = store.current_revision();
        apply((0..KEYS).step_by(10).map(|i| put(i, 2)).collect());
        let revisions = [after_first, after_deletes, store.current_revision()];
        let before: Vec<_> = revisions.iter().map(|&r| all_keys_at(&store, r)).collect();
        drop(store);

        let reopened = Store::open(engine).expect("reopen");
        assert_eq!(reopened.current_revision(), revisions[2]);
        for (&rev, expected) in revisions.iter().zip(&before) {
            assert_eq!(&all_keys_at(&reopened, rev), expected, "at revision {rev}");
        }
        // Keys deleted and written again are live with a new create revision.
        assert_eq!(before[2].len(), KEYS - KEYS.div_ceil(5) + KEYS.div_ceil(10));
    }

    /// Keys keep their lease over a reopen (read from the index, not from each record).
    #[test]
    fn a_reopened_store_attaches_keys_to_their_leases() {
        let engine = Arc::new(MemoryEngine::new());
        let store = Store::open(engine.clone()).expect("open");
        let grant = command(Op::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 7 }));
        let put = |key: &str, lease: i64| {
            command(Op::Put(PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: b"v".to_vec().into(),
                lease,
                ..Default::default()
            }))
        };
        store
            .apply(1, &[grant, put("a", 7), put("b", 0), put("c", 7)])
            .expect("apply");
        // Written again without the lease: detached.
        store.apply(2, &[put("c", 0)]).expect("apply");
        drop(store);

        let reopened = Store::open(engine).expect("reopen");
        let lease = reopened.lease(7, true).expect("the lease survives");
        assert_eq!(lease.keys, vec![bytes::Bytes::from_static(b"a")]);
    }
}
