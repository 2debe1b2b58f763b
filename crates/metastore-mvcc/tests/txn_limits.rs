//! A Txn that writes answers its ranges in the apply step, bounded by the member's response
//! limit. The limit is each member's own setting, so it may change only that member's answer,
//! never what is written: two stores with different limits must end identical.

mod support;
use bytes::Bytes;
use metastore_mvcc::{ApplyResponse, MvccError, Store};
use metastore_proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
use metastore_proto::internal::{command::Op, Command};
use support::TestEngine;

fn command(op: Op) -> Command {
    Command {
        auth: None,
        op: Some(op),
    }
}

fn put(key: String) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: Bytes::from(key),
            value: Bytes::from(vec![b'v'; 1024]),
            ..Default::default()
        })),
    }
}

/// A range over every `big/` key, then writes around and after it.
fn txn_reading_everything() -> Command {
    let range = RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: Bytes::from_static(b"big/"),
            range_end: Bytes::from_static(b"big0"),
            ..Default::default()
        })),
    };
    command(Op::Txn(TxnRequest {
        success: vec![
            put("before".into()),
            range.clone(),
            put("after".into()),
            range,
        ],
        ..Default::default()
    }))
}

fn everything(store: &Store<TestEngine>) -> Vec<(Bytes, i64, i64)> {
    let all = RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        ..Default::default()
    };
    let resp = store.range(&all).expect("range");
    resp.kvs
        .into_iter()
        .map(|kv| (kv.key, kv.mod_revision, kv.version))
        .collect()
}

#[test]
fn a_write_txn_over_the_response_limit_fails_its_answer_but_writes_what_every_member_writes() {
    let open = || Store::open(std::sync::Arc::new(TestEngine::from_env())).expect("open");
    let (limited, unlimited) = (open(), open());
    limited.set_apply_response_limit(64 * 1024);
    let fill = command(Op::Txn(TxnRequest {
        success: (0..100).map(|i| put(format!("big/{i:03}"))).collect(),
        ..Default::default()
    }));
    for store in [&limited, &unlimited] {
        let done = store.apply(1, std::slice::from_ref(&fill)).expect("apply");
        done.expect("a new entry")[0].as_ref().expect("fill");
    }

    let over = limited
        .apply(2, &[txn_reading_everything()])
        .expect("apply")
        .expect("a new entry");
    assert!(
        matches!(
            over[0],
            Err(MvccError::ResponseTooLarge { limit: 65536, .. })
        ),
        "{:?}",
        over[0].as_ref().map(|_| "an answer")
    );
    let answered = unlimited
        .apply(2, &[txn_reading_everything()])
        .expect("apply")
        .expect("a new entry");
    let Ok(ApplyResponse::Txn(resp)) = &answered[0] else {
        panic!("the unlimited store answers the txn");
    };
    assert_eq!(resp.responses.len(), 4);

    assert_eq!(limited.current_revision(), unlimited.current_revision());
    assert_eq!(everything(&limited), everything(&unlimited));
    let keys: Vec<Bytes> = everything(&limited)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert!(keys.contains(&Bytes::from_static(b"before")));
    assert!(
        keys.contains(&Bytes::from_static(b"after")),
        "the write after the range applied"
    );
}
