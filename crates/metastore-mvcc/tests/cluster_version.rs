//! The replicated cluster version: set through an applied command, kept by the engine and in
//! snapshots, never lowered, and a member older than the cluster stops instead of applying
//! on (etcd's "invalid downgrade"). An operation this build does not know stops it too.

mod support;

use metastore_engine::{Engine, Space, WriteBatch};
use metastore_memory::MemoryEngine;
use metastore_mvcc::snapshot::{load_snapshot, write_snapshot};
use metastore_mvcc::{ApplyResponse, ClusterVersion, MvccError, Store};
use metastore_proto::internal::{command::Op, ClusterVersionSet, Command};
use std::sync::Arc;
use support::TestEngine;

fn set(version: &str) -> Command {
    Command {
        auth: None,
        op: Some(Op::ClusterVersionSet(ClusterVersionSet {
            version: version.into(),
        })),
    }
}

fn this_build() -> ClusterVersion {
    ClusterVersion::this_build()
}

fn newer() -> ClusterVersion {
    ClusterVersion {
        major: this_build().major,
        minor: this_build().minor + 1,
    }
}

#[test]
fn the_version_set_is_kept_by_the_engine_and_never_lowered() {
    let engine = Arc::new(TestEngine::from_env());
    let store = Store::open(engine.clone()).expect("open");
    assert_eq!(store.cluster_version(), None);
    let answers = store
        .apply(1, &[set(&this_build().to_string())])
        .expect("apply")
        .expect("new entry");
    assert!(matches!(
        answers[..],
        [Ok(ApplyResponse::ClusterVersion(Some(v)))] if v == this_build()
    ));
    // An older version proposed later (a stale leader) changes nothing.
    let answers = store.apply(2, &[set("0.0")]).expect("apply").expect("new");
    assert!(matches!(
        answers[..],
        [Ok(ApplyResponse::ClusterVersion(Some(v)))] if v == this_build()
    ));
    drop(store);
    let reopened = Store::open(engine).expect("reopen");
    assert_eq!(reopened.cluster_version(), Some(this_build()));
}

#[test]
fn a_snapshot_carries_the_version() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Store::open(engine.clone()).expect("open");
    store
        .apply(1, &[set(&this_build().to_string())])
        .expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_snapshot(engine.as_ref(), dir.path(), 1, 1, 3).expect("snapshot");
    let restored = Arc::new(MemoryEngine::new());
    load_snapshot(restored.as_ref(), &path).expect("load");
    assert_eq!(
        Store::open(restored).expect("open").cluster_version(),
        Some(this_build())
    );
}

#[test]
fn a_member_older_than_the_cluster_stops_applying() {
    let store = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    let err = store
        .apply(1, &[set(&newer().to_string())])
        .expect_err("a newer cluster version fails the entry");
    assert_eq!(
        err,
        MvccError::Downgrade {
            cluster: newer().to_string(),
            member: this_build().to_string()
        }
    );
    assert!(err.to_string().starts_with("invalid downgrade"), "{err}");
    assert_eq!(store.applied_index(), 0, "the entry is not applied");
    assert_eq!(store.cluster_version(), None);
}

#[test]
fn a_data_dir_of_a_newer_cluster_is_refused_at_open() {
    let engine = Arc::new(TestEngine::from_env());
    let mut batch = WriteBatch::new();
    batch.put(
        Space::Meta,
        b"cluster_version".to_vec(),
        newer().to_string().into_bytes(),
    );
    engine.write(batch).expect("write");
    match Store::open(engine) {
        Err(MvccError::Downgrade { cluster, member }) => {
            assert_eq!(
                (cluster, member),
                (newer().to_string(), this_build().to_string())
            );
        }
        Err(other) => panic!("expected a downgrade refusal, got {other}"),
        Ok(_) => panic!("opened the data of a newer cluster"),
    }
}

#[test]
fn an_operation_this_build_does_not_know_stops_the_member() {
    let store = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    let put = Command {
        auth: None,
        op: Some(Op::Put(metastore_proto::etcdserverpb::PutRequest {
            key: "a".into(),
            value: "1".into(),
            ..Default::default()
        })),
    };
    // prost decodes an unknown oneof field as no operation at all.
    let err = store
        .apply(
            7,
            &[
                put,
                Command {
                    auth: None,
                    op: None,
                },
            ],
        )
        .expect_err("an unknown operation fails the entry");
    assert_eq!(err, MvccError::UnknownCommand(7));
    assert_eq!(store.applied_index(), 0);
}
