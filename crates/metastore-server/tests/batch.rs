//! MetaStore's batch API (`metastore.v1.Batch`) against the real binary, through the
//! `metastore-client` helper; what it wrote is checked through the `etcd-client` crate, the way
//! any etcd user would see it.

mod common;

use bytes::Bytes;
use common::TestServer;
use etcd_client::{EventType, GetOptions, WatchOptions};
use metastore_client::BatchClient;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore_proto::metastore::v1::{BatchGetRequest, BatchPutRequest};
use std::time::Duration;
use tonic::Code;

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value.to_string()),
        ..Default::default()
    }
}

async fn batch_client(server: &TestServer) -> BatchClient {
    BatchClient::connect(&server.endpoint())
        .await
        .expect("connect the batch client")
}

#[tokio::test]
async fn batch_put_writes_every_key_at_one_revision_in_one_watch_response() {
    let server = TestServer::start().await;
    let mut etcd = server.client().await;
    let mut client = batch_client(&server).await;
    let before = etcd
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    let mut watch = etcd
        .watch("bk/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let created = watch
        .message()
        .await
        .expect("watch stream")
        .expect("created");
    assert!(created.created());

    let pairs: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("bk/{i:04}"), format!("value-{i}")))
        .collect();
    let revision = client.put_all(pairs.clone()).await.expect("BatchPut");
    assert_eq!(revision, before + 1, "one revision for the whole batch");

    let resp = etcd
        .get("bk/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(resp.count(), 1000);
    for (kv, (k, v)) in resp.kvs().iter().zip(&pairs) {
        assert_eq!(kv.key_str().expect("utf8"), k);
        assert_eq!(kv.value_str().expect("utf8"), v);
        assert_eq!(kv.mod_revision(), revision);
        assert_eq!(kv.create_revision(), revision);
        assert_eq!(kv.version(), 1);
    }

    // Watchers see one revision carrying all 1000 puts (possibly fragmented by size, never
    // split across revisions).
    let mut events = 0;
    while events < 1000 {
        let msg = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("events in time")
            .expect("watch stream")
            .expect("a response");
        for ev in msg.events() {
            assert_eq!(ev.event_type(), EventType::Put);
            assert_eq!(ev.kv().expect("kv").mod_revision(), revision);
            events += 1;
        }
    }
    assert_eq!(events, 1000);
}

#[tokio::test]
async fn batch_get_reads_keys_and_ranges_at_one_revision() {
    let server = TestServer::start().await;
    let mut etcd = server.client().await;
    for i in 0..5 {
        etcd.put(format!("bg/{i}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let mut client = batch_client(&server).await;
    let values = client
        .get_all(["bg/0", "bg/4", "bg/missing"])
        .await
        .expect("BatchGet");
    assert_eq!(
        values,
        vec![Some(Bytes::from("v0")), Some(Bytes::from("v4")), None]
    );

    // Full range requests: a prefix with a limit, and a historical read.
    let first_rev = etcd.get("bg/0", None).await.expect("get").kvs()[0].mod_revision();
    etcd.put("bg/0", "changed", None).await.expect("put");
    let resp = client
        .inner()
        .batch_get(BatchGetRequest {
            ranges: vec![
                RangeRequest {
                    key: Bytes::from("bg/"),
                    range_end: Bytes::from("bg0"),
                    limit: 2,
                    ..Default::default()
                },
                RangeRequest {
                    key: Bytes::from("bg/0"),
                    revision: first_rev,
                    ..Default::default()
                },
                RangeRequest {
                    key: Bytes::from("bg/0"),
                    ..Default::default()
                },
            ],
            serializable: false,
        })
        .await
        .expect("BatchGet")
        .into_inner();
    let header = resp.header.expect("header");
    assert!(header.cluster_id != 0 && header.member_id != 0);
    assert_eq!(resp.responses.len(), 3);
    assert_eq!(resp.responses[0].kvs.len(), 2);
    assert_eq!(resp.responses[0].count, 5);
    assert!(resp.responses[0].more);
    assert_eq!(resp.responses[1].kvs[0].value, Bytes::from("v0"));
    assert_eq!(resp.responses[2].kvs[0].value, Bytes::from("changed"));
    assert_eq!(resp.responses[2].kvs[0].mod_revision, header.revision);
}

#[tokio::test]
async fn batch_put_refuses_bad_batches_with_etcd_errors() {
    let server = TestServer::start().await;
    let mut client = batch_client(&server).await;
    let mut etcd = server.client().await;

    let err = client
        .inner()
        .batch_put(BatchPutRequest {
            puts: vec![put("dup", "a"), put("other", "b"), put("dup", "c")],
        })
        .await
        .expect_err("duplicate keys refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "etcdserver: duplicate key given in txn request"
    );

    let err = client
        .inner()
        .batch_put(BatchPutRequest {
            puts: vec![put("ok", "a"), put("", "b")],
        })
        .await
        .expect_err("empty key refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "etcdserver: key is not provided");

    let too_many: Vec<PutRequest> = (0..1001).map(|i| put(&format!("k{i}"), "v")).collect();
    let err = client
        .inner()
        .batch_put(BatchPutRequest { puts: too_many })
        .await
        .expect_err("over 1000 refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());

    let err = client
        .inner()
        .batch_put(BatchPutRequest { puts: vec![] })
        .await
        .expect_err("empty batch refused");
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = client
        .inner()
        .batch_put(BatchPutRequest {
            puts: vec![PutRequest {
                lease: 12345,
                ..put("leased", "v")
            }],
        })
        .await
        .expect_err("unknown lease refused");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "etcdserver: requested lease not found");

    let err = client
        .inner()
        .batch_get(BatchGetRequest {
            ranges: vec![RangeRequest::default()],
            serializable: false,
        })
        .await
        .expect_err("empty key refused");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing of the refused batches was written.
    let resp = etcd
        .get(
            "",
            Some(GetOptions::new().with_from_key().with_count_only()),
        )
        .await
        .expect("count");
    assert_eq!(resp.count(), 0);
}

#[tokio::test]
async fn batch_put_honours_prev_kv_and_leases_and_survives_a_restart() {
    let mut server = TestServer::start().await;
    let mut etcd = server.client().await;
    etcd.put("pk/a", "old", None).await.expect("put");
    let lease = etcd.lease_grant(60, None).await.expect("grant").id();
    let mut client = batch_client(&server).await;
    let resp = client
        .inner()
        .batch_put(BatchPutRequest {
            puts: vec![
                PutRequest {
                    prev_kv: true,
                    ..put("pk/a", "new")
                },
                PutRequest {
                    lease,
                    ..put("pk/leased", "x")
                },
            ],
        })
        .await
        .expect("BatchPut")
        .into_inner();
    assert_eq!(resp.responses.len(), 2);
    let prev = resp.responses[0].prev_kv.as_ref().expect("prev_kv");
    assert_eq!(prev.value, Bytes::from("old"));
    assert!(resp.responses[1].prev_kv.is_none());

    let ttl = etcd
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("ttl");
    assert_eq!(ttl.keys(), [b"pk/leased".to_vec()]);

    server.kill9();
    server.restart().await;
    let mut etcd = server.client().await;
    let got = etcd.get("pk/a", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"new");

    etcd.lease_revoke(lease).await.expect("revoke");
    let got = etcd.get("pk/leased", None).await.expect("get");
    assert_eq!(
        got.count(),
        0,
        "revoking the lease deleted the batch-put key"
    );
}
