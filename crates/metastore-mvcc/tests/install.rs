//! Installing a leader's snapshot replaces a store's whole state (records, index, revisions,
//! leases), and HashKV agrees between a store and one that installed its snapshot; a crash in
//! the middle of an install on a persistent engine is detected at open and finished from the
//! file. Runs on either engine (METASTORE_TEST_ENGINE).

mod support;

use metastore_mvcc::snapshot::write_snapshot;
use metastore_mvcc::{interrupted_install, replace_engine_contents, MvccError, Store, WatchSpec};
use metastore_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest,
};
use metastore_proto::internal::{command::Op, Command};
use std::path::PathBuf;
use std::sync::Arc;
use support::TestEngine;

fn put(key: &str, value: &str, lease: i64) -> Command {
    Command {
        auth: None,
        op: Some(Op::Put(PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            lease,
            ..Default::default()
        })),
    }
}

fn delete(key: &str) -> Command {
    Command {
        auth: None,
        op: Some(Op::DeleteRange(DeleteRangeRequest {
            key: key.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

fn compact(rev: i64) -> Command {
    Command {
        auth: None,
        op: Some(Op::Compaction(CompactionRequest {
            revision: rev,
            physical: true,
        })),
    }
}

fn grant(id: i64) -> Command {
    Command {
        auth: None,
        op: Some(Op::LeaseGrant(LeaseGrantRequest { id, ttl: 100 })),
    }
}

/// A leader's store with history, a lease and a compaction, applied up to raft index 40.
fn leader_store() -> (Arc<Store<TestEngine>>, u64) {
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    let mut index = 0;
    let mut apply = |cmds: Vec<Command>| {
        index += 1;
        store.apply(index, &cmds).expect("apply");
    };
    apply(vec![grant(7)]);
    for i in 0..30 {
        let key = format!("k{}", i % 8);
        if i % 7 == 6 {
            apply(vec![delete(&key)]);
        } else {
            apply(vec![put(
                &key,
                &format!("v{i}"),
                if i % 5 == 0 { 7 } else { 0 },
            )]);
        }
    }
    apply(vec![compact(12)]);
    for i in 0..8 {
        apply(vec![put(&format!("k{i}"), "last", 0)]);
    }
    (store, index)
}

fn all_keys(store: &Store<TestEngine>) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    store
        .range(&RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| (kv.key.to_vec(), kv.value.to_vec(), kv.mod_revision))
        .collect()
}

fn snapshot_of(store: &Store<TestEngine>, index: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_snapshot(store.engine().as_ref(), dir.path(), index, 1, 1).expect("write");
    (dir, path)
}

#[test]
fn an_install_replaces_everything_and_hashes_agree() {
    let (leader, index) = leader_store();
    let (_dir, path) = snapshot_of(&leader, index);

    // A follower with a diverging past of its own, a lease the leader never had, and a
    // watcher from its start.
    let follower = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    follower.apply(1, &[grant(99)]).expect("apply");
    follower.apply(2, &[put("stale", "x", 99)]).expect("apply");
    let (stream, mut rx) = follower.open_watch_stream();
    let spec = WatchSpec {
        key: b"k".to_vec().into(),
        range_end: b"l".to_vec().into(),
        start_revision: 0,
        ..Default::default()
    };
    assert!(follower.watch(stream, spec).is_some());

    follower.install_snapshot(&path, index).expect("install");
    assert_eq!(all_keys(&follower), all_keys(&leader));
    assert_eq!(follower.current_revision(), leader.current_revision());
    assert_eq!(follower.compact_revision(), 12);
    assert_eq!(follower.applied_index(), index);
    assert!(follower.lease(99, false).is_none(), "the old lease is gone");
    assert_eq!(
        follower.lease(7, true).map(|l| l.keys.len()),
        leader.lease(7, true).map(|l| l.keys.len())
    );
    assert_eq!(
        follower.hash_kv(0).expect("hash"),
        leader.hash_kv(0).expect("hash")
    );
    assert_eq!(
        follower.hash_kv(20).expect("hash"),
        leader.hash_kv(20).expect("hash")
    );
    assert_eq!(
        follower.hash_all().expect("hash"),
        leader.hash_all().expect("hash")
    );
    assert_eq!(follower.hash_kv(12), Err(MvccError::Compacted));
    assert_eq!(
        follower.hash_kv(follower.current_revision() + 1),
        Err(MvccError::FutureRev)
    );

    // The watcher (which had seen nothing past revision 2) is caught up from the installed
    // history: the compacted start cancels it, as etcd cancels a watcher left behind.
    let sync = Arc::new(follower);
    sync.spawn_watch_sync().expect("sync thread");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let canceled = runtime.block_on(async {
        let wait = std::time::Duration::from_secs(5);
        while let Ok(Some((resp, _slot))) = tokio::time::timeout(wait, rx.recv()).await {
            if resp.canceled && resp.compact_revision == 12 {
                return true;
            }
        }
        false
    });
    assert!(canceled, "the watcher behind the compaction was canceled");
    // The install then goes on: a write after it applies on top of the new state.
    sync.apply(index + 1, &[put("after", "1", 0)])
        .expect("apply");
    assert_eq!(sync.current_revision(), leader.current_revision() + 1);
}

#[test]
fn hashes_differ_when_the_state_differs() {
    let (a, _) = leader_store();
    let (b, index) = leader_store();
    assert_eq!(a.hash_kv(0).expect("hash"), b.hash_kv(0).expect("hash"));
    let before = a.current_revision();
    b.apply(index + 1, &[put("k0", "other", 0)]).expect("apply");
    a.apply(index + 1, &[put("k0", "another", 0)])
        .expect("apply");
    assert_ne!(
        a.hash_kv(0).expect("hash").hash,
        b.hash_kv(0).expect("hash").hash
    );
    assert_eq!(
        a.hash_kv(before).map(|h| h.hash),
        b.hash_kv(before).map(|h| h.hash),
        "the history before the writes still agrees"
    );
}

/// An install cut short (here: a damaged snapshot file, which fails half-way through the
/// load, after the old state was cleared) leaves a persistent engine marked; opening it is
/// refused until the install is finished from a good file.
#[test]
fn an_interrupted_install_is_refused_at_open_and_finished_from_the_file() {
    let (leader, index) = leader_store();
    let (dir, good) = snapshot_of(&leader, index);
    let mut bytes = std::fs::read(&good).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).expect("write");

    let engine = Arc::new(TestEngine::from_env());
    {
        let follower = Store::open(engine.clone()).expect("open");
        follower.apply(1, &[put("stale", "x", 0)]).expect("apply");
        assert!(follower.install_snapshot(&damaged, index).is_err());
    }
    if !metastore_engine::Engine::is_persistent(engine.as_ref()) {
        // The memory engine's durable state is its snapshot files: nothing to mark.
        return;
    }
    assert_eq!(
        interrupted_install(engine.as_ref()).expect("read mark"),
        Some(index)
    );
    assert!(matches!(
        Store::open(engine.clone()),
        Err(MvccError::InstallInterrupted(i)) if i == index
    ));
    replace_engine_contents(engine.as_ref(), &good, index).expect("finish");
    assert_eq!(
        interrupted_install(engine.as_ref()).expect("read mark"),
        None
    );
    let follower = Store::open(engine).expect("open after the install");
    assert_eq!(all_keys(&follower), all_keys(&leader));
    assert_eq!(
        follower.hash_kv(0).expect("hash"),
        leader.hash_kv(0).expect("hash")
    );
}

#[test]
fn an_install_of_a_snapshot_at_another_index_is_refused() {
    let (leader, index) = leader_store();
    let (_dir, path) = snapshot_of(&leader, index);
    let follower = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    let err = follower
        .install_snapshot(&path, index + 5)
        .expect_err("wrong index");
    assert!(err.to_string().contains("holds raft index"), "{err}");
}
