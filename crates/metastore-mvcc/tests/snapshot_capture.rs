//! A snapshot captured between two applied entries and written while applying goes on (and a
//! compaction arrives) holds exactly the state at the capture: the same records a snapshot of
//! a quiesced store at that point holds. The compaction's deletes follow once it is written.

use bytes::Bytes;
use metastore_engine::{Engine, Space};
use metastore_memory::MemoryEngine;
use metastore_mvcc::snapshot::{load_snapshot, snapshot_path, write_snapshot};
use metastore_mvcc::Store;
use metastore_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};
use metastore_proto::internal::{command::Op, Command};
use std::ops::Bound;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

fn put(key: &str, value: String) -> Command {
    Command {
        auth: None,
        op: Some(Op::Put(PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value),
            ..Default::default()
        })),
    }
}

fn records(engine: &MemoryEngine) -> Vec<(Space, Vec<u8>, Bytes)> {
    let mut out = Vec::new();
    for space in Space::ALL {
        engine
            .scan(space, (Bound::Unbounded, Bound::Unbounded), &mut |k, v| {
                out.push((space, k.to_vec(), v.clone()));
                true
            })
            .expect("scan");
    }
    out
}

#[test]
fn a_capture_written_during_later_applies_and_a_compaction_holds_the_captured_state() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Arc::new(Store::open(engine.clone()).expect("open"));
    let mut index = 0;
    for i in 0..200 {
        index += 1;
        store
            .apply(index, &[put(&format!("k{}", i % 10), format!("v{i}"))])
            .expect("apply");
    }
    index += 1;
    let delete = Command {
        auth: None,
        op: Some(Op::DeleteRange(DeleteRangeRequest {
            key: Bytes::from("k3"),
            ..Default::default()
        })),
    };
    store.apply(index, &[delete]).expect("delete");
    let captured_at = index;

    let dir = tempfile::tempdir().expect("tempdir");
    let quiesced = dir.path().join("quiesced");
    write_snapshot(engine.as_ref(), &quiesced, captured_at, 1, 3).expect("reference snapshot");

    let capture = store.capture_snapshot().expect("capture");

    // Applying goes on: more puts, then a compaction that would drop records of the capture.
    let (done_tx, done_rx) = mpsc::channel();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut index = captured_at;
            for i in 0..100 {
                index += 1;
                store
                    .apply(index, &[put(&format!("k{}", i % 10), format!("late{i}"))])
                    .expect("apply");
            }
            index += 1;
            let compact = Command {
                auth: None,
                op: Some(Op::Compaction(CompactionRequest {
                    revision: 250,
                    physical: true,
                })),
            };
            store.apply(index, &[compact]).expect("compact");
            let _ = done_tx.send(());
        })
    };
    // Applying and the compaction go on while the capture is held; the compaction's engine
    // deletes wait until the capture has read the engine.
    writer.join().expect("writer");
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the compaction did not wait for the capture");
    let concurrent = dir.path().join("concurrent");
    capture
        .with_pace(0.5)
        .write(engine.as_ref(), &concurrent, captured_at, 1, 3)
        .expect("write the capture");

    // The next write deletes the deferred records: a new capture holds the compacted state.
    let before_flush = records(&engine).len();
    store
        .apply(captured_at + 102, &[put("k0", "after".into())])
        .expect("apply");
    let after_flush = records(&engine).len();
    assert!(
        after_flush < before_flush,
        "compacted records were deleted once the capture was done ({before_flush} -> {after_flush})"
    );
    let current = store.current_revision();
    let resp = store
        .range(&metastore_proto::etcdserverpb::RangeRequest {
            key: Bytes::from("k"),
            range_end: Bytes::from("l"),
            ..Default::default()
        })
        .expect("range");
    assert_eq!(resp.kvs.len(), 10);
    assert!(resp.header.expect("header").revision == current);

    let from_quiesced = MemoryEngine::new();
    load_snapshot(&from_quiesced, &snapshot_path(&quiesced, captured_at)).expect("load");
    let from_concurrent = MemoryEngine::new();
    load_snapshot(&from_concurrent, &snapshot_path(&concurrent, captured_at)).expect("load");
    let expected = records(&from_quiesced);
    assert!(expected.len() > 200);
    assert_eq!(records(&from_concurrent), expected);
}
