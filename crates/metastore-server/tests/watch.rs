//! Black-box Watch tests: hold `metastore` to etcd's v3 Watch semantics,
//! talking to the real binary through the `etcd-client` crate.
//!
//! Every test starts its own single-member server (fresh data dir), so
//! revision arithmetic is exact. Every wait is bounded (`STEP`), so a server
//! that never answers fails the test instead of hanging it.
//!
//! The etcd source each expectation comes from is named next to it (paths in
//! the etcd-io/etcd repository: server/etcdserver/api/v3rpc/watch.go,
//! server/mvcc/watchable_store.go, server/mvcc/watcher.go, ...). Every test
//! was run against real etcd (3.4.23 and 3.5.1) through `METASTORE_TEST_BIN`
//! before being pointed at metastore.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::fmt::Debug;
use std::time::Duration;

use common::TestServer;
use etcd_client::{
    Client, CompactionOptions, DeleteOptions, Event, EventType, PutOptions, Txn, TxnOp,
    WatchFilterType, WatchOptions, WatchResponse, WatchStream,
};
use tokio::time::timeout;

/// Upper bound for any single expected watch response or request.
const STEP: Duration = Duration::from_secs(15);

/// etcd's cancel reasons (server/mvcc/watcher.go).
const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

async fn setup() -> (TestServer, Client) {
    let srv = TestServer::start().await;
    let client = srv.client().await;
    (srv, client)
}

fn rev_of(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.expect("response has no header").revision()
}

/// Current store revision, read through a Range of a key no test writes.
async fn current_rev(c: &mut Client) -> i64 {
    rev_of(c.get("__never_written__", None).await.unwrap().header())
}

async fn put(c: &mut Client, k: &str, v: &str) -> i64 {
    rev_of(c.put(k, v, None).await.unwrap().header())
}

/// Unwrap a bounded wait on a future returning an etcd-client result.
async fn within<T, F>(what: &str, fut: F) -> T
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match timeout(STEP, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e:?}"),
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

/// Next message on the stream; panics on error, end of stream or timeout.
async fn next_msg(ws: &mut WatchStream) -> WatchResponse {
    match timeout(STEP, ws.message()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => panic!("watch stream ended unexpectedly"),
        Ok(Err(e)) => panic!("watch stream error: {e:?}"),
        Err(_) => panic!("no watch response within {STEP:?}"),
    }
}

/// Assert that nothing arrives on the stream for `d`.
async fn expect_quiet(ws: &mut WatchStream, d: Duration) {
    if let Ok(r) = timeout(d, ws.message()).await {
        panic!("expected no watch response, got {r:?}");
    }
}

/// Open a stream with one watcher and consume its `created` response.
/// Returns (stream, watch id, header revision of the created response).
async fn open(c: &mut Client, key: &str, opts: Option<WatchOptions>) -> (WatchStream, i64, i64) {
    let mut ws = within("watch()", c.watch(key, opts)).await;
    let r = next_msg(&mut ws).await;
    assert!(r.created(), "first response must be `created`: {r:?}");
    assert!(!r.canceled(), "watch unexpectedly canceled: {r:?}");
    assert!(
        r.events().is_empty(),
        "created response carries no events: {r:?}"
    );
    let rev = rev_of(r.header());
    (ws, r.watch_id(), rev)
}

/// Add a watcher on an existing stream and consume its `created` response.
async fn add(ws: &mut WatchStream, key: &str, opts: Option<WatchOptions>) -> WatchResponse {
    within("send create", ws.watch(key, opts)).await;
    let r = next_msg(ws).await;
    assert!(r.created(), "expected a created response: {r:?}");
    r
}

/// The events of the next response, which must be an event response of `id`.
async fn next_events(ws: &mut WatchStream, id: i64) -> WatchResponse {
    let r = next_msg(ws).await;
    assert_eq!(
        r.watch_id(),
        id,
        "response for an unexpected watcher: {r:?}"
    );
    assert!(
        !r.created() && !r.canceled(),
        "expected an event response: {r:?}"
    );
    assert!(!r.events().is_empty(), "expected events, got none: {r:?}");
    r
}

/// (type, key, value, mod_revision) of an event, for compact comparisons.
type Ev = (EventType, String, String, i64);

fn ev(e: &Event) -> Ev {
    let kv = e.kv().expect("event without kv");
    (
        e.event_type(),
        String::from_utf8_lossy(kv.key()).into_owned(),
        String::from_utf8_lossy(kv.value()).into_owned(),
        kv.mod_revision(),
    )
}

fn evs(r: &WatchResponse) -> Vec<Ev> {
    r.events().iter().map(ev).collect()
}

fn p(k: &str, v: &str, rev: i64) -> Ev {
    (EventType::Put, k.to_string(), v.to_string(), rev)
}

fn d(k: &str, rev: i64) -> Ev {
    (EventType::Delete, k.to_string(), String::new(), rev)
}

/// etcd-client 0.21 does not expose `WatchResponse.fragment`; read it from
/// the Debug form of the wrapped protobuf message (keys and values print as
/// byte arrays, so the text cannot appear inside event data).
fn is_fragment<T: Debug>(r: &T) -> bool {
    format!("{r:?}").contains("fragment: true")
}

// ---------------------------------------------------------------------------
// creating watchers: key, range, prefix, ids
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watch_key_range_and_prefix() {
    let (_srv, mut c) = setup().await;
    let (mut wkey, id_key, r0) = open(&mut c, "k/b", None).await;
    // The created response carries the store revision at creation.
    assert_eq!(r0, current_rev(&mut c).await);
    // Server-assigned ids start at 0 on every stream (mvcc/watcher.go
    // AutoWatchID + watchStream.nextID); each c.watch() is a new stream.
    assert_eq!(id_key, 0);
    let (mut wrange, id_range, _) =
        open(&mut c, "k/a", Some(WatchOptions::new().with_range("k/c"))).await;
    assert_eq!(id_range, 0);
    let (mut wprefix, id_prefix, _) =
        open(&mut c, "k/", Some(WatchOptions::new().with_prefix())).await;
    assert_eq!(id_prefix, 0);
    let (mut wall, _, _) = open(&mut c, "", Some(WatchOptions::new().with_all_keys())).await;

    let r1 = put(&mut c, "k/a", "1").await;
    let r2 = put(&mut c, "k/b", "2").await;
    let r3 = put(&mut c, "k/c", "3").await;
    let r4 = put(&mut c, "other", "4").await;
    let r5 = rev_of(c.delete("k/b", None).await.unwrap().header());

    // Single key: only k/b, both its put and its delete.
    let r = next_events(&mut wkey, id_key).await;
    assert_eq!(evs(&r), vec![p("k/b", "2", r2)]);
    // A synced watcher's response header carries the event's revision.
    assert_eq!(rev_of(r.header()), r2);
    let r = next_events(&mut wkey, id_key).await;
    assert_eq!(evs(&r), vec![d("k/b", r5)]);

    // [k/a, k/c): k/a and k/b, not k/c.
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(evs(&next_events(&mut wrange, id_range).await));
    }
    assert_eq!(
        got,
        vec![p("k/a", "1", r1), p("k/b", "2", r2), d("k/b", r5)]
    );

    // Prefix k/: everything under k/, not "other".
    let mut got = Vec::new();
    while got.len() < 4 {
        got.extend(evs(&next_events(&mut wprefix, id_prefix).await));
    }
    assert_eq!(
        got,
        vec![
            p("k/a", "1", r1),
            p("k/b", "2", r2),
            p("k/c", "3", r3),
            d("k/b", r5)
        ]
    );

    // All keys ("\0".."\0"): every event, in revision order.
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(evs(&next_events(&mut wall, 0).await));
    }
    assert_eq!(
        got,
        vec![
            p("k/a", "1", r1),
            p("k/b", "2", r2),
            p("k/c", "3", r3),
            p("other", "4", r4),
            d("k/b", r5),
        ]
    );

    // Nothing else is pending for the narrow watchers.
    expect_quiet(&mut wkey, Duration::from_millis(300)).await;
    expect_quiet(&mut wrange, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn event_kv_fields_for_put_and_delete() {
    // mvcc/watchable_store_txn.go End(): a delete event's kv carries only the
    // key and mod_revision = the deleting revision.
    let (_srv, mut c) = setup().await;
    let (mut ws, id, _) = open(&mut c, "f", None).await;
    let r1 = put(&mut c, "f", "v1").await;
    let r2 = put(&mut c, "f", "v2").await;
    let r3 = rev_of(c.delete("f", None).await.unwrap().header());

    let r = next_events(&mut ws, id).await;
    let kv = r.events()[0].kv().unwrap();
    assert_eq!(r.events()[0].event_type(), EventType::Put);
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.value()
        ),
        (r1, r1, 1, &b"v1"[..])
    );
    assert!(r.events()[0].prev_kv().is_none(), "prev_kv only when asked");
    let r = next_events(&mut ws, id).await;
    let kv = r.events()[0].kv().unwrap();
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.value()
        ),
        (r1, r2, 2, &b"v2"[..])
    );
    let r = next_events(&mut ws, id).await;
    assert_eq!(r.events()[0].event_type(), EventType::Delete);
    let kv = r.events()[0].kv().unwrap();
    assert_eq!(kv.key(), b"f");
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.value(),
            kv.lease()
        ),
        (0, r3, 0, &b""[..], 0)
    );
}

#[tokio::test]
async fn several_watchers_on_one_stream_with_auto_and_client_ids() {
    // mvcc/watcher.go watchStream.Watch: id 0 means "assign one"; assigned
    // ids come from a per-stream counter that skips ids in use and never goes
    // back; a client id already in use is rejected.
    let (_srv, mut c) = setup().await;
    let (mut ws, id0, _) = open(&mut c, "w/a", None).await;
    assert_eq!(id0, 0);

    let r = add(&mut ws, "w/b", Some(WatchOptions::new().with_watch_id(7))).await;
    assert_eq!(r.watch_id(), 7, "a client-chosen id is used as is");
    assert!(!r.canceled());

    let r = add(&mut ws, "w/c", None).await;
    assert_eq!(r.watch_id(), 1, "next server-assigned id");
    let r = add(&mut ws, "w/d", Some(WatchOptions::new().with_watch_id(2))).await;
    assert_eq!(r.watch_id(), 2);
    let r = add(&mut ws, "w/e", None).await;
    assert_eq!(
        r.watch_id(),
        3,
        "assigned ids skip ids chosen by the client"
    );

    // Duplicate client id: a created+canceled response with watch_id -1
    // (api/v3rpc/watch.go recvLoop: id = -1 on error, CancelReason = err).
    let r = add(&mut ws, "w/x", Some(WatchOptions::new().with_watch_id(7))).await;
    assert!(r.canceled(), "duplicate id must be refused: {r:?}");
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.cancel_reason(), ERR_DUPLICATE_ID);
    // The original watcher 7 is untouched (checked below by its events).

    // Events reach the right watcher ids.
    let ra = put(&mut c, "w/a", "a").await;
    let rb = put(&mut c, "w/b", "b").await;
    let rc = put(&mut c, "w/c", "c").await;
    let rd = put(&mut c, "w/d", "d").await;
    let re = put(&mut c, "w/e", "e").await;
    put(&mut c, "w/x", "x").await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = next_msg(&mut ws).await;
        assert!(!r.created() && !r.canceled(), "{r:?}");
        assert_eq!(r.events().len(), 1, "{r:?}");
        seen.push((r.watch_id(), ev(&r.events()[0])));
    }
    assert_eq!(
        seen,
        vec![
            (0, p("w/a", "a", ra)),
            (7, p("w/b", "b", rb)),
            (1, p("w/c", "c", rc)),
            (2, p("w/d", "d", rd)),
            (3, p("w/e", "e", re)),
        ]
    );
    expect_quiet(&mut ws, Duration::from_millis(300)).await;

    // Cancel watcher 0; a later auto id does not reuse it (nextID only grows).
    within("cancel", ws.cancel(0)).await;
    let r = next_msg(&mut ws).await;
    assert!(r.canceled() && !r.created(), "{r:?}");
    assert_eq!(r.watch_id(), 0);
    let r = add(&mut ws, "w/f", None).await;
    assert!(!r.canceled());
    assert_eq!(r.watch_id(), 4);
}

#[tokio::test]
async fn cancel_stops_events_and_unknown_cancel_is_ignored() {
    let (_srv, mut c) = setup().await;
    let (mut ws, id_a, _) = open(&mut c, "ca", None).await;
    let id_b = add(&mut ws, "cb", None).await.watch_id();
    assert_ne!(id_a, id_b);

    let r1 = put(&mut c, "ca", "1").await;
    assert_eq!(
        evs(&next_events(&mut ws, id_a).await),
        vec![p("ca", "1", r1)]
    );

    within("cancel", ws.cancel(id_a)).await;
    let r = next_msg(&mut ws).await;
    assert!(r.canceled(), "expected the cancel response: {r:?}");
    assert!(!r.created());
    assert_eq!(r.watch_id(), id_a);
    assert!(r.events().is_empty());
    assert!(r.header().is_some());

    // The canceled watcher gets nothing more; the other one still works:
    // its event must be the very next message on the stream.
    put(&mut c, "ca", "2").await;
    let rb = put(&mut c, "cb", "b").await;
    let r = next_events(&mut ws, id_b).await;
    assert_eq!(evs(&r), vec![p("cb", "b", rb)]);

    // Canceling an id that does not exist produces no response at all
    // (api/v3rpc/watch.go: a response is sent only if Cancel succeeded).
    // Control responses keep request order, so the next message must be the
    // created response of the watcher requested after the bogus cancel.
    within("cancel unknown", ws.cancel(12345)).await;
    within("cancel again", ws.cancel(id_a)).await;
    let r = add(&mut ws, "cc", Some(WatchOptions::new().with_watch_id(99))).await;
    assert_eq!(r.watch_id(), 99, "unexpected response: {r:?}");
    assert!(!r.canceled());
}

#[tokio::test]
async fn empty_range_is_refused() {
    // mvcc/watcher.go: range_end <= key (and range_end non-empty) is
    // ErrEmptyWatcherRange; api/v3rpc/watch.go answers created + canceled
    // with watch_id -1.
    let (_srv, mut c) = setup().await;
    let mut ws = within(
        "watch()",
        c.watch("b", Some(WatchOptions::new().with_range("a"))),
    )
    .await;
    let r = next_msg(&mut ws).await;
    assert!(r.created() && r.canceled(), "{r:?}");
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.cancel_reason(), ERR_EMPTY_RANGE);

    // range_end == key is empty too.
    within(
        "send",
        ws.watch("same", Some(WatchOptions::new().with_range("same"))),
    )
    .await;
    let r = next_msg(&mut ws).await;
    assert!(r.created() && r.canceled(), "{r:?}");
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.cancel_reason(), ERR_EMPTY_RANGE);

    // The stream survives: a valid watcher on it still works, and the
    // refused ones never produce events. The refused creates used no id, so
    // the first real watcher still gets 0.
    let r = add(&mut ws, "a", Some(WatchOptions::new().with_range("c"))).await;
    assert!(!r.canceled());
    assert_eq!(r.watch_id(), 0);
    let rev = put(&mut c, "b", "x").await;
    let r = next_events(&mut ws, 0).await;
    assert_eq!(evs(&r), vec![p("b", "x", rev)]);
}

// ---------------------------------------------------------------------------
// start revision, history, compaction
// ---------------------------------------------------------------------------

#[tokio::test]
async fn start_revision_in_the_past_replays_then_goes_live() {
    let (_srv, mut c) = setup().await;
    let mut revs = Vec::new();
    for i in 1..=5 {
        revs.push(put(&mut c, "h", &format!("v{i}")).await);
    }
    put(&mut c, "h-other", "x").await;
    let r_del = rev_of(c.delete("h", None).await.unwrap().header());

    // Watch from the 2nd put: replay v2..v5 and the delete, then live events.
    let (mut ws, id, created_rev) = open(
        &mut c,
        "h",
        Some(WatchOptions::new().with_start_revision(revs[1])),
    )
    .await;
    assert_eq!(created_rev, r_del);

    let live_writer = {
        let mut c2 = c.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 6..=8 {
                out.push(rev_of(
                    c2.put("h", format!("v{i}"), None).await.unwrap().header(),
                ));
            }
            out
        })
    };

    let mut got = Vec::new();
    while got.len() < 8 {
        let r = next_events(&mut ws, id).await;
        got.extend(evs(&r));
    }
    let live = timeout(STEP, live_writer).await.unwrap().unwrap();
    let mut want = vec![
        p("h", "v2", revs[1]),
        p("h", "v3", revs[2]),
        p("h", "v4", revs[3]),
        p("h", "v5", revs[4]),
        d("h", r_del),
    ];
    for (i, r) in live.iter().enumerate() {
        want.push(p("h", &format!("v{}", i + 6), *r));
    }
    // Exactly this sequence: no gap, no duplicate, in revision order.
    assert_eq!(got, want);
    expect_quiet(&mut ws, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn start_revision_in_the_future_waits_for_it() {
    // mvcc/watchable_store.go watch(): startRev > currentRev makes a synced
    // watcher that only gets events with revision >= startRev.
    let (_srv, mut c) = setup().await;
    let now = put(&mut c, "fut", "0").await;
    let (mut ws, id, _) = open(
        &mut c,
        "fut",
        Some(WatchOptions::new().with_start_revision(now + 3)),
    )
    .await;
    put(&mut c, "fut", "1").await; // now + 1
    put(&mut c, "fut", "2").await; // now + 2
    let r3 = put(&mut c, "fut", "3").await;
    assert_eq!(r3, now + 3);
    let r = next_events(&mut ws, id).await;
    assert_eq!(evs(&r), vec![p("fut", "3", r3)]);
}

#[tokio::test]
async fn compacted_start_revision_cancels_with_compact_revision() {
    // mvcc/watchable_store.go syncWatchers/chooseAll: a watcher whose start
    // revision is below the compaction revision gets a response with
    // CompactRevision set and is removed; api/v3rpc/watch.go sendLoop marks
    // such a response canceled. The created response comes first.
    let (_srv, mut c) = setup().await;
    let mut revs = Vec::new();
    for i in 1..=4 {
        revs.push(put(&mut c, "cmp", &format!("v{i}")).await);
    }
    let compact_at = revs[2];
    c.compact(compact_at, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    let mut ws = within(
        "watch()",
        c.watch(
            "cmp",
            Some(WatchOptions::new().with_start_revision(revs[0])),
        ),
    )
    .await;
    let r = next_msg(&mut ws).await;
    assert!(
        r.created() && !r.canceled(),
        "a plain created response first: {r:?}"
    );
    let id = r.watch_id();
    let r = next_msg(&mut ws).await;
    assert!(
        r.canceled() && !r.created(),
        "expected the compaction cancel: {r:?}"
    );
    assert_eq!(r.watch_id(), id);
    assert_eq!(r.compact_revision(), compact_at);
    assert!(r.events().is_empty());
    // The canceled watcher sends nothing more.
    put(&mut c, "cmp", "v5").await;
    expect_quiet(&mut ws, Duration::from_millis(300)).await;

    // Starting exactly at the compaction revision is allowed and replays it.
    let (mut ws, id, _) = open(
        &mut c,
        "cmp",
        Some(WatchOptions::new().with_start_revision(compact_at)),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(evs(&next_events(&mut ws, id).await));
    }
    assert_eq!(got[0], p("cmp", "v3", revs[2]));
    assert_eq!(got[1], p("cmp", "v4", revs[3]));
    assert_eq!(got[2].2, "v5");
}

// ---------------------------------------------------------------------------
// prev_kv and filters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn prev_kv() {
    // api/v3rpc/watch.go sendLoop: prev_kv is read at mod_revision - 1 for
    // every event that is not a create.
    let (_srv, mut c) = setup().await;
    let r0 = put(&mut c, "pk", "v1").await;
    let (mut ws, id, _) = open(&mut c, "pk", Some(WatchOptions::new().with_prev_key())).await;
    let (mut plain, pid, _) = open(&mut c, "pk", None).await;

    let r1 = put(&mut c, "pk", "v2").await;
    let r2 = rev_of(c.delete("pk", None).await.unwrap().header());
    let r3 = put(&mut c, "pk", "v3").await;

    let r = next_events(&mut ws, id).await;
    assert_eq!(evs(&r), vec![p("pk", "v2", r1)]);
    let prev = r.events()[0]
        .prev_kv()
        .expect("overwrite must carry prev_kv");
    assert_eq!(prev.value(), b"v1");
    assert_eq!(prev.mod_revision(), r0);
    assert_eq!(prev.version(), 1);

    let r = next_events(&mut ws, id).await;
    assert_eq!(evs(&r), vec![d("pk", r2)]);
    let prev = r.events()[0].prev_kv().expect("delete must carry prev_kv");
    assert_eq!(prev.value(), b"v2");
    assert_eq!(prev.mod_revision(), r1);

    let r = next_events(&mut ws, id).await;
    assert_eq!(evs(&r), vec![p("pk", "v3", r3)]);
    assert!(r.events()[0].prev_kv().is_none(), "a create has no prev_kv");

    // A watcher that did not ask never gets prev_kv.
    for _ in 0..3 {
        let r = next_events(&mut plain, pid).await;
        assert!(r.events()[0].prev_kv().is_none(), "{r:?}");
    }
}

#[tokio::test]
async fn noput_and_nodelete_filters() {
    let (_srv, mut c) = setup().await;
    let (mut ws, id_nodel, _) = open(
        &mut c,
        "flt/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoDelete]),
        ),
    )
    .await;
    let id_noput = add(
        &mut ws,
        "flt/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]),
        ),
    )
    .await
    .watch_id();
    let id_sentinel = add(&mut ws, "sentinel", None).await.watch_id();

    let r1 = put(&mut c, "flt/a", "1").await;
    let r2 = rev_of(c.delete("flt/a", None).await.unwrap().header());
    let r3 = put(&mut c, "flt/b", "2").await;
    let r4 = rev_of(
        c.delete("flt/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap()
            .header(),
    );
    let rs = put(&mut c, "sentinel", "s").await;

    let mut nodel = Vec::new();
    let mut noput = Vec::new();
    loop {
        let r = next_msg(&mut ws).await;
        assert!(!r.created() && !r.canceled(), "{r:?}");
        if r.watch_id() == id_sentinel {
            assert_eq!(evs(&r), vec![p("sentinel", "s", rs)]);
            break;
        } else if r.watch_id() == id_nodel {
            nodel.extend(evs(&r));
        } else if r.watch_id() == id_noput {
            noput.extend(evs(&r));
        } else {
            panic!("unexpected watcher id in {r:?}");
        }
    }
    assert_eq!(nodel, vec![p("flt/a", "1", r1), p("flt/b", "2", r3)]);
    assert_eq!(noput, vec![d("flt/a", r2), d("flt/b", r4)]);
}

// ---------------------------------------------------------------------------
// one response per revision
// ---------------------------------------------------------------------------

#[tokio::test]
async fn txn_events_arrive_in_one_response_per_watcher() {
    let (_srv, mut c) = setup().await;
    let (mut ws, id_a, _) = open(&mut c, "ta/", Some(WatchOptions::new().with_prefix())).await;
    let id_b = add(&mut ws, "tb/", Some(WatchOptions::new().with_prefix()))
        .await
        .watch_id();
    let id_all = add(&mut ws, "t", Some(WatchOptions::new().with_prefix()))
        .await
        .watch_id();
    put(&mut c, "tb/old", "o").await;
    // Drain the tb/old events of id_b and id_all.
    for _ in 0..2 {
        next_msg(&mut ws).await;
    }

    let resp = c
        .txn(Txn::new().and_then([
            TxnOp::put("ta/2", "x", None),
            TxnOp::put("tb/1", "y", None),
            TxnOp::put("ta/1", "z", None),
            TxnOp::delete("tb/old", None),
        ]))
        .await
        .unwrap();
    let rev = rev_of(resp.header());

    let mut by_id = std::collections::HashMap::new();
    for _ in 0..3 {
        let r = next_msg(&mut ws).await;
        assert!(!r.created() && !r.canceled(), "{r:?}");
        assert_eq!(rev_of(r.header()), rev);
        assert!(
            by_id.insert(r.watch_id(), evs(&r)).is_none(),
            "a second response for watcher {} in one revision: {r:?}",
            r.watch_id()
        );
    }
    // Events keep the order of the txn's operations.
    assert_eq!(by_id[&id_a], vec![p("ta/2", "x", rev), p("ta/1", "z", rev)]);
    assert_eq!(by_id[&id_b], vec![p("tb/1", "y", rev), d("tb/old", rev)]);
    assert_eq!(
        by_id[&id_all],
        vec![
            p("ta/2", "x", rev),
            p("tb/1", "y", rev),
            p("ta/1", "z", rev),
            d("tb/old", rev),
        ]
    );
    expect_quiet(&mut ws, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn lease_revoke_deletes_in_one_response() {
    // lease/lessor.go Revoke: all attached keys are deleted in one txn, in
    // sorted key order.
    let (_srv, mut c) = setup().await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    for k in ["lr/c", "lr/a", "lr/b"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }
    put(&mut c, "lr/unleased", "u").await;
    let (mut ws, id, _) = open(&mut c, "lr/", Some(WatchOptions::new().with_prefix())).await;
    let resp = c.lease_revoke(lease).await.unwrap();
    let rev = rev_of(resp.header());
    let r = next_events(&mut ws, id).await;
    assert_eq!(
        evs(&r),
        vec![d("lr/a", rev), d("lr/b", rev), d("lr/c", rev)]
    );
    assert_eq!(rev_of(r.header()), rev);
    expect_quiet(&mut ws, Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------
// progress
// ---------------------------------------------------------------------------

#[tokio::test]
async fn request_progress_reports_current_revision() {
    // api/v3rpc/watch.go recvLoop, ProgressRequest: a response with no
    // events, header revision = the store's current revision and
    // watch_id -1 (clientv3.InvalidWatchID: it speaks for the whole stream).
    let (_srv, mut c) = setup().await;
    let (mut ws, _id, _) = open(&mut c, "prog", None).await;
    put(&mut c, "unrelated", "1").await;
    let now = put(&mut c, "unrelated", "2").await;

    within("request_progress", ws.request_progress()).await;
    let r = next_msg(&mut ws).await;
    assert!(!r.created() && !r.canceled(), "{r:?}");
    assert!(r.events().is_empty(), "{r:?}");
    assert_eq!(r.watch_id(), -1, "progress response watch_id: {r:?}");
    assert_eq!(rev_of(r.header()), now);

    // Again after an event on the watched key: the event first, then the
    // progress response at the newer revision.
    let rk = put(&mut c, "prog", "x").await;
    let r = next_msg(&mut ws).await;
    assert_eq!(evs(&r), vec![p("prog", "x", rk)]);
    within("request_progress", ws.request_progress()).await;
    let r = next_msg(&mut ws).await;
    assert!(r.events().is_empty(), "{r:?}");
    assert_eq!(r.watch_id(), -1);
    assert_eq!(rev_of(r.header()), rk);
}

#[tokio::test]
async fn progress_notify_is_periodic_and_per_watcher() {
    // api/v3rpc/watch.go sendLoop progressTicker: each watcher created with
    // progress_notify and idle since the last tick gets an empty response
    // with its own watch_id and the current revision. etcd:
    // --experimental-watch-progress-notify-interval; metastore:
    // --watch-progress-notify-interval-ms.
    let srv = TestServer::start_with_args(&["--watch-progress-notify-interval-ms", "500"]).await;
    let mut c = srv.client().await;
    let (mut ws, id_quiet, _) = open(&mut c, "pn-plain", None).await;
    let id_pn = add(
        &mut ws,
        "pn",
        Some(WatchOptions::new().with_progress_notify()),
    )
    .await
    .watch_id();
    assert_ne!(id_quiet, id_pn);
    let now = put(&mut c, "pn-unrelated", "1").await;

    // Several notifications within a few intervals.
    let mut notes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while notes < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let r = match timeout(left, ws.message()).await {
            Ok(Ok(Some(r))) => r,
            other => {
                panic!("expected 3 progress notifications in 4 s, got {notes}; then {other:?}")
            }
        };
        assert!(r.events().is_empty(), "{r:?}");
        assert!(!r.created() && !r.canceled(), "{r:?}");
        assert_eq!(
            r.watch_id(),
            id_pn,
            "only the progress_notify watcher is notified: {r:?}"
        );
        assert!(rev_of(r.header()) >= now, "{r:?}");
        notes += 1;
    }

    // Events still flow, and notifications continue afterwards at the new
    // revision.
    let rk = put(&mut c, "pn", "x").await;
    let mut saw_event = false;
    let mut saw_later_note = false;
    while !(saw_event && saw_later_note) {
        let r = next_msg(&mut ws).await;
        assert_eq!(r.watch_id(), id_pn, "{r:?}");
        if r.events().is_empty() {
            if saw_event {
                assert_eq!(rev_of(r.header()), rk);
                saw_later_note = true;
            }
        } else {
            assert_eq!(evs(&r), vec![p("pn", "x", rk)]);
            saw_event = true;
        }
    }
}

// ---------------------------------------------------------------------------
// fragments
// ---------------------------------------------------------------------------

/// Values of 40 KiB: each put fits a 64 KiB request, but 30 of them (1.2 MB)
/// exceed both 64 KiB and etcd's limit + 512 KiB gRPC overhead.
const BIG: usize = 40 * 1024;
const NBIG: usize = 30;

fn all_puts(r: &WatchResponse) -> bool {
    r.events().iter().all(|e| e.event_type() == EventType::Put)
}

async fn big_delete_revision(c: &mut Client, pfx: &str) -> i64 {
    for i in 0..NBIG {
        let v = vec![b'a' + (i % 26) as u8; BIG];
        c.put(format!("{pfx}{i:02}"), v, None).await.unwrap();
    }
    // One revision with NBIG delete events; with prev_kv each carries 40 KiB.
    rev_of(
        c.delete(pfx, Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap()
            .header(),
    )
}

#[tokio::test]
async fn fragment_splits_large_revisions_only_when_asked() {
    // api/v3rpc/watch.go sendFragments: a watcher created with fragment=true
    // gets a revision whose response exceeds the server's request limit
    // split into several responses, all but the last with fragment=true.
    // (etcd's limit there is --max-request-bytes + 512 KiB gRPC overhead.)
    let srv = TestServer::start_with_args(&["--max-request-bytes", "65536"]).await;
    let mut c = srv.client().await;
    let mut wc = srv.client().await;
    let (mut frag, fid, _) = open(
        &mut wc,
        "big/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_fragment(),
        ),
    )
    .await;
    let (mut whole, wid, _) = open(
        &mut wc,
        "big/",
        Some(WatchOptions::new().with_prefix().with_prev_key()),
    )
    .await;
    let rev = big_delete_revision(&mut c, "big/").await;

    // Fragmented watcher: skip the put events, then collect the fragments of
    // the delete revision.
    let mut parts = Vec::new();
    loop {
        let r = next_msg(&mut frag).await;
        assert_eq!(r.watch_id(), fid, "{r:?}");
        if all_puts(&r) {
            assert!(!is_fragment(&r), "a small response is never a fragment");
            continue;
        }
        let more = is_fragment(&r);
        assert_eq!(rev_of(r.header()), rev);
        parts.push(r);
        if !more {
            break;
        }
    }
    assert!(
        parts.len() >= 2,
        "expected the revision to be split, got {} part(s)",
        parts.len()
    );
    let mut keys = Vec::new();
    for part in &parts {
        assert!(!part.events().is_empty(), "every fragment carries events");
        for e in part.events() {
            assert_eq!(e.event_type(), EventType::Delete);
            assert_eq!(e.kv().unwrap().mod_revision(), rev);
            assert_eq!(e.prev_kv().expect("prev_kv").value().len(), BIG);
            keys.push(String::from_utf8_lossy(e.kv().unwrap().key()).into_owned());
        }
    }
    let want: Vec<String> = (0..NBIG).map(|i| format!("big/{i:02}")).collect();
    assert_eq!(
        keys, want,
        "fragments concatenate to the whole revision, in order"
    );

    // Watcher without the flag: the same revision arrives as one response.
    loop {
        let r = next_msg(&mut whole).await;
        assert_eq!(r.watch_id(), wid, "{r:?}");
        if all_puts(&r) {
            continue;
        }
        assert!(!is_fragment(&r), "fragment set without being asked");
        assert_eq!(r.events().len(), NBIG, "one response with every event");
        break;
    }
}

// ---------------------------------------------------------------------------
// slow consumer
// ---------------------------------------------------------------------------

fn slow_value(i: usize) -> String {
    format!("{i:05}-{}", "x".repeat(294))
}

#[tokio::test]
async fn slow_consumer_gets_every_event_exactly_once_in_order() {
    // mvcc/watchable_store.go: a watcher whose channel is full becomes a
    // victim and is later resynced from history; no event is lost or
    // repeated. The watcher has its own connection so that an unread stream
    // cannot stall the writers through HTTP/2 connection flow control.
    //
    // Values are 300 bytes on purpose: the client's HTTP/2 library (h2 >=
    // 0.4.20) counts buffered, unread DATA frames under 256 bytes against a
    // budget and kills the connection with GOAWAY ENHANCE_YOUR_CALM
    // "too_many_data_frames" when a stream nobody reads fills with tiny
    // frames. That is a client-side guard, not server behaviour; with
    // frames of >= 256 bytes it never triggers.
    const N: usize = 20_000;
    const WRITERS: usize = 32;
    let srv = TestServer::start().await;
    let mut wc = srv.client().await;
    let c = srv.client().await;
    let (mut ws, id, start) = open(&mut wc, "slow/", Some(WatchOptions::new().with_prefix())).await;

    // Writers: N puts of distinct keys, not reading the stream meanwhile.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < N {
                c.put(format!("slow/{i:05}"), slow_value(i), None)
                    .await
                    .unwrap();
                i += WRITERS;
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(120), t)
            .await
            .expect("writers too slow")
            .unwrap();
    }
    let mut c = c;
    let end = current_rev(&mut c).await;
    assert_eq!(end - start, N as i64, "exactly N revisions were written");

    // Now read everything.
    let mut seen = HashSet::new();
    let mut last_rev = start;
    while seen.len() < N {
        let r = next_msg(&mut ws).await;
        assert_eq!(r.watch_id(), id, "{r:?}");
        assert!(!r.canceled(), "watcher canceled: {r:?}");
        for e in r.events() {
            let kv = e.kv().unwrap();
            assert_eq!(e.event_type(), EventType::Put);
            assert_eq!(
                kv.mod_revision(),
                last_rev + 1,
                "gap or duplicate after rev {last_rev}"
            );
            last_rev = kv.mod_revision();
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let i: usize = key["slow/".len()..].parse().unwrap();
            assert_eq!(kv.value(), slow_value(i).as_bytes());
            assert!(seen.insert(key.clone()), "event for {key} delivered twice");
        }
    }
    assert_eq!(last_rev, end);
    expect_quiet(&mut ws, Duration::from_millis(300)).await;
}
