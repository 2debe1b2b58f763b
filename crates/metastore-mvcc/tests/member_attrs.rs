//! Published member attributes are replicated state: applied, kept by the engine and in
//! snapshots, the latest publication of a member winning.

mod support;

use metastore_memory::MemoryEngine;
use metastore_mvcc::snapshot::{load_snapshot, write_snapshot};
use metastore_mvcc::Store;
use metastore_proto::internal::{command::Op, Command, MemberAttrSet};
use std::sync::Arc;
use support::TestEngine;

fn publish(id: u64, url: &str) -> Command {
    Command {
        auth: None,
        op: Some(Op::MemberAttrSet(MemberAttrSet {
            member_id: id,
            name: format!("m{id}"),
            client_urls: vec![url.to_string()],
            is_witness: false,
        })),
    }
}

#[test]
fn attributes_survive_reopen_and_the_latest_wins() {
    let engine = Arc::new(TestEngine::from_env());
    let store = Store::open(engine.clone()).expect("open");
    let revision = store.current_revision();
    store
        .apply(1, &[publish(1, "http://a:1"), publish(2, "http://b:1")])
        .expect("apply");
    store.apply(2, &[publish(1, "http://a:2")]).expect("apply");
    assert_eq!(
        store.current_revision(),
        revision,
        "no revision for membership"
    );
    drop(store);
    let attrs = Store::open(engine).expect("reopen").member_attrs();
    assert_eq!(attrs.len(), 2);
    assert_eq!(attrs[&1].client_urls, ["http://a:2"]);
    assert_eq!(attrs[&2].name, "m2");
}

#[test]
fn a_snapshot_carries_the_attributes() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Store::open(engine.clone()).expect("open");
    store.apply(1, &[publish(7, "http://c:1")]).expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_snapshot(engine.as_ref(), dir.path(), 1, 1, 3).expect("snapshot");
    let restored = Arc::new(MemoryEngine::new());
    load_snapshot(restored.as_ref(), &path).expect("load");
    let attrs = Store::open(restored).expect("open").member_attrs();
    assert_eq!(attrs[&7].client_urls, ["http://c:1"]);
}
