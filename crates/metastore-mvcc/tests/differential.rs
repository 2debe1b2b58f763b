//! The same random operation sequences applied to the memory engine and to RocksDB: every
//! response must be identical, and so must the final stores (every record, and a hash of every
//! key at every readable revision), also after reopening the RocksDB store.

mod support;

use bytes::Bytes;
use metastore_engine::{Engine, Space};
use metastore_mvcc::{ApplyResponse, Store};
use metastore_proto::etcdserverpb::{
    compare, request_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use metastore_proto::internal::{command::Op, Command};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::Arc;
use support::TestEngine;

const KEYS: &[&str] = &["a", "a1", "b", "b1", "c", "d"];

fn key(rng: &mut StdRng) -> Bytes {
    Bytes::from(KEYS[rng.random_range(0..KEYS.len())].as_bytes().to_vec())
}

fn random_put(rng: &mut StdRng) -> PutRequest {
    PutRequest {
        key: key(rng),
        value: Bytes::from(vec![b'x'; rng.random_range(0..64)]),
        prev_kv: rng.random_bool(0.5),
        ..Default::default()
    }
}

fn random_range(rng: &mut StdRng, current: i64) -> RangeRequest {
    let (key, range_end) = match rng.random_range(0..3) {
        0 => (key(rng), Bytes::new()),
        1 => (Bytes::from_static(b"a"), Bytes::from_static(b"c")),
        _ => (Bytes::from_static(&[0]), Bytes::from_static(&[0])),
    };
    RangeRequest {
        key,
        range_end,
        limit: rng.random_range(0..4),
        revision: if rng.random_bool(0.3) {
            rng.random_range(0..=current + 1)
        } else {
            0
        },
        sort_order: rng.random_range(0..3),
        sort_target: rng.random_range(0..5),
        keys_only: rng.random_bool(0.2),
        count_only: rng.random_bool(0.1),
        ..Default::default()
    }
}

fn random_command(rng: &mut StdRng, current: i64) -> Command {
    let op = match rng.random_range(0..10) {
        0..=3 => Op::Put(random_put(rng)),
        4 | 5 => Op::DeleteRange(DeleteRangeRequest {
            key: key(rng),
            range_end: if rng.random_bool(0.3) {
                Bytes::from_static(b"c")
            } else {
                Bytes::new()
            },
            prev_kv: rng.random_bool(0.5),
        }),
        6..=8 => Op::Txn(TxnRequest {
            compare: vec![Compare {
                result: rng.random_range(0..4),
                target: rng.random_range(0..4),
                key: key(rng),
                range_end: Bytes::new(),
                target_union: Some(compare::TargetUnion::Version(rng.random_range(0..3))),
            }],
            success: vec![
                RequestOp {
                    request: Some(request_op::Request::RequestPut(random_put(rng))),
                },
                RequestOp {
                    request: Some(request_op::Request::RequestRange(random_range(
                        rng, current,
                    ))),
                },
            ],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: key(rng),
                        ..Default::default()
                    },
                )),
            }],
        }),
        _ => Op::Compaction(CompactionRequest {
            revision: rng.random_range(0..=current + 1),
            physical: true,
        }),
    };
    Command {
        auth: None,
        op: Some(op),
    }
}

fn records(engine: &dyn Engine) -> Vec<(Space, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for space in Space::ALL {
        engine
            .scan(space, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
                out.push((space, k.to_vec(), v.to_vec()));
                true
            })
            .expect("scan");
    }
    out
}

/// Every key at every readable revision, hashed.
fn state_hash<E: Engine>(store: &Store<E>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let all = RangeRequest {
        key: Bytes::from_static(&[0]),
        range_end: Bytes::from_static(&[0]),
        ..Default::default()
    };
    for rev in store.compact_revision().max(1)..=store.current_revision() {
        let resp = store
            .range(&RangeRequest {
                revision: rev,
                ..all.clone()
            })
            .expect("range");
        format!("{:?}", resp.kvs).hash(&mut h);
    }
    store.current_revision().hash(&mut h);
    store.compact_revision().hash(&mut h);
    h.finish()
}

fn header_revision(result: &ApplyResponse) -> i64 {
    let header = match result {
        ApplyResponse::Put(r) => &r.header,
        ApplyResponse::DeleteRange(r) => &r.header,
        ApplyResponse::Txn(r) => &r.header,
        ApplyResponse::Compaction(r) => &r.header,
        _ => return 0,
    };
    header.as_ref().map_or(0, |h| h.revision)
}

#[test]
fn memory_and_rocksdb_answer_every_request_identically() {
    let mut split_entries = 0;
    for seed in 0..24u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let memory = Store::open(Arc::new(TestEngine::memory())).expect("open memory");
        let rocks_engine = Arc::new(TestEngine::rocksdb());
        let mut rocks = Store::open(rocks_engine.clone()).expect("open rocksdb");
        let mut index = 0;
        for step in 0..150 {
            let current = memory.current_revision();
            if rng.random_bool(0.25) {
                let req = random_range(&mut rng, current);
                assert_eq!(
                    memory.range(&req),
                    rocks.range(&req),
                    "seed {seed} step {step}: {req:?}"
                );
                continue;
            }
            let batch: Vec<Command> = (0..rng.random_range(1..6))
                .map(|_| random_command(&mut rng, current))
                .collect();
            index += 1;
            // The memory store answers in parts (RocksDB never splits an entry); each part
            // must already be visible to readers when it is handed out.
            let part_len = rng.random_range(1..4);
            // A compaction's physical half runs at the end of its entry: no split after it.
            let compacts = batch
                .iter()
                .any(|c| matches!(c.op, Some(Op::Compaction(_))));
            let mut parts: Vec<Vec<_>> = Vec::new();
            let applied = memory
                .apply_in_parts(index, &batch, part_len, &mut |part| {
                    assert!(
                        part.len() <= part_len || compacts,
                        "seed {seed} step {step}: part too long"
                    );
                    let visible = memory.current_revision();
                    for result in part.iter().flatten() {
                        assert!(
                            header_revision(result) <= visible,
                            "seed {seed} step {step}: {result:?} answered before revision {visible} was visible"
                        );
                    }
                    // An answered put reads back, from the engine, at its own revision.
                    let offset: usize = parts.iter().map(Vec::len).sum();
                    for (cmd, result) in batch[offset..].iter().zip(&part) {
                        if let (Some(Op::Put(p)), Ok(ApplyResponse::Put(r))) = (&cmd.op, result) {
                            let rev = r.header.as_ref().map_or(0, |h| h.revision);
                            let read = memory
                                .range(&RangeRequest {
                                    key: p.key.clone(),
                                    revision: rev,
                                    ..Default::default()
                                })
                                .expect("read an answered put");
                            let kv = read.kvs.first().expect("answered put is readable");
                            assert_eq!(
                                (&kv.value, kv.mod_revision),
                                (&p.value, rev),
                                "seed {seed} step {step}: answered put reads back differently"
                            );
                        }
                    }
                    parts.push(part);
                })
                .expect("memory apply");
            split_entries += usize::from(parts.len() > 1);
            let a = applied.then(|| parts.concat());
            let b = rocks.apply(index, &batch).expect("rocksdb apply");
            assert_eq!(a, b, "seed {seed} step {step}: {batch:?}");
            if rng.random_bool(0.05) {
                // A flushed RocksDB store reopened from disk goes on identically.
                rocks_engine.persist().expect("flush");
                rocks = Store::open(rocks_engine.clone()).expect("reopen");
            }
        }
        assert_eq!(
            records(memory.engine().as_ref()),
            records(rocks.engine().as_ref()),
            "seed {seed}: engines differ"
        );
        assert_eq!(
            state_hash(&memory),
            state_hash(&rocks),
            "seed {seed}: state hashes differ"
        );
        assert_eq!(memory.applied_index(), rocks.applied_index());
    }
    assert!(
        split_entries > 100,
        "only {split_entries} entries were answered in parts"
    );
}
