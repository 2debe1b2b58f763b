use super::*;
use metastore_proto::mvccpb::KeyValue;

fn put_event(key: &str, rev: i64) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.as_bytes().to_vec().into(),
            mod_revision: rev,
            create_revision: rev,
            version: 1,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

fn spec(key: &str, start: i64) -> WatchSpec {
    WatchSpec {
        key: key.as_bytes().to_vec().into(),
        start_revision: start,
        ..Default::default()
    }
}

fn revisions(rx: &mut StreamReceiver) -> Vec<i64> {
    let mut out = Vec::new();
    while let Some(msg) = rx.try_recv() {
        out.extend(
            msg.events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision),
        );
    }
    out
}

/// A watcher created while a catch-up round reads history, starting further back than that
/// read, must not be handed the partial history (it would silently skip revisions).
#[test]
fn watcher_created_during_a_catch_up_read_waits_for_the_next_round() {
    let history: Vec<Event> = (2..=9).map(|r| put_event("k", r)).collect();
    let hub = WatchHub::new(9);
    let (stream, mut rx) = hub.open_stream();
    hub.watch(stream, spec("k", 6), -1);
    let late = std::cell::Cell::new(false);
    let read = |from: i64, to: i64| {
        if !late.replace(true) {
            // A second watcher arrives, from revision 3, while history [6, 9] is read.
            hub.watch(stream, spec("k", 3), -1);
        }
        Some(History {
            events: history
                .iter()
                .filter(|e| {
                    e.kv.as_ref()
                        .is_some_and(|kv| (from..=to).contains(&kv.mod_revision))
                })
                .cloned()
                .collect(),
            to,
        })
    };
    let caught_up = hub.sync_round(&|| -1, &read, std::time::Duration::ZERO);
    assert!(!caught_up, "the late watcher is still behind");
    assert!(hub.sync_round(&|| -1, &read, std::time::Duration::ZERO));
    // First watcher: 6..=9; second: 3..=9 — all of it, from the second round.
    let mut got = revisions(&mut rx);
    got.sort_unstable();
    assert_eq!(got, vec![3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9]);
}

fn event_message_bytes(rev: i64) -> usize {
    use prost::Message as _;
    WatchResponse {
        header: header(rev),
        watch_id: 0,
        events: vec![put_event("k", rev)],
        ..Default::default()
    }
    .encoded_len()
}

#[test]
fn a_full_stream_drops_its_watcher_to_catch_up_instead_of_blocking() {
    let hub = WatchHub::new(1);
    // Room for 100 event messages after the "created" one.
    let per_message = event_message_bytes(2);
    hub.set_limits(WatchLimits {
        stream_queue_bytes: 100 * per_message + 20,
        ..WatchLimits::default()
    });
    let (stream, mut rx) = hub.open_stream();
    let room = rx.room();
    hub.watch(stream, spec("k", 0), -1);
    for rev in 2..1000 {
        hub.dispatch(rev, Some(&[put_event("k", rev)]));
    }
    // The stream holds its limit in bytes; the rest waits in the store's history.
    assert!(room.queued_bytes() <= 100 * per_message + 20);
    let delivered = revisions(&mut rx);
    assert!((90..=100).contains(&delivered.len()), "{}", delivered.len());
    assert_eq!(hub.inner.lock().unsynced.len(), 1);
    assert_eq!(room.queued_bytes(), 0);
}

#[test]
fn control_messages_count_against_the_limit_and_readers_wait_for_room() {
    let hub = WatchHub::new(1);
    hub.set_limits(WatchLimits {
        stream_queue_bytes: 1000,
        watchers_per_stream: 3,
        ..WatchLimits::default()
    });
    let (stream, mut rx) = hub.open_stream();
    let room = rx.room();
    for _ in 0..200 {
        hub.progress_all(stream);
    }
    assert!(room.queued_bytes() >= 1000, "{}", room.queued_bytes());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), room.wait());
        assert!(
            waited.await.is_err(),
            "a full stream must make the reader wait"
        );
        let reader = tokio::spawn({
            let room = room.clone();
            async move { room.wait().await }
        });
        while rx.try_recv().is_some() {}
        tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("room freed wakes the reader")
            .expect("reader task");
    });
    // Watchers per stream: the fourth is refused with a reason.
    for i in 0..4 {
        let got = hub.watch(stream, spec(&format!("k{i}"), 0), -1);
        assert_eq!(got.is_some(), i < 3);
    }
    let mut last = None;
    while let Some(msg) = rx.try_recv() {
        last = Some(msg);
    }
    let refusal = last.expect("a refusal");
    assert!(refusal.created && refusal.canceled);
    assert_eq!(refusal.cancel_reason, ERR_TOO_MANY_WATCHERS);
}

#[test]
fn catch_up_messages_are_bounded_by_bytes_and_keep_revisions_whole() {
    let big = |rev: i64| {
        let mut e = put_event("k", rev);
        if let Some(kv) = e.kv.as_mut() {
            kv.value = vec![b'v'; 400 * 1024].into();
        }
        e
    };
    let history = vec![big(2), big(2), big(2), big(3), big(4), big(5)];
    // Far behind: a round reads revisions 2..=1001 only.
    let hub = WatchHub::new(6000);
    let (stream, mut rx) = hub.open_stream();
    hub.watch(stream, spec("k", 2), -1);
    // A second watcher starting past this round's window keeps its start revision.
    hub.watch(stream, spec("k", 5000), -1);
    let read = |_: i64, to: i64| {
        Some(History {
            events: history.clone(),
            to,
        })
    };
    assert!(!hub.sync_round(&|| -1, &read, std::time::Duration::ZERO));
    let mut sizes = Vec::new();
    while let Some(msg) = rx.try_recv() {
        if !msg.events.is_empty() {
            sizes.push(msg.events.len());
        }
    }
    // Revision 2 whole although it is over the message size; then one revision a message.
    assert_eq!(sizes, vec![3, 1, 1, 1]);
    let inner = hub.inner.lock();
    let mut next: Vec<(i64, i64)> = inner
        .watchers
        .values()
        .map(|w| (w.spec.start_revision, w.next_rev))
        .collect();
    next.sort_unstable();
    assert_eq!(next, vec![(2, 1002), (5000, 5000)]);
}

#[test]
fn many_slow_streams_together_stay_under_the_total_limit() {
    let hub = WatchHub::new(1);
    let per_message = event_message_bytes(2);
    hub.set_limits(WatchLimits {
        stream_queue_bytes: 1 << 20,
        total_queue_bytes: 50 * per_message,
        ..WatchLimits::default()
    });
    let mut receivers = Vec::new();
    for _ in 0..10 {
        let (stream, rx) = hub.open_stream();
        hub.watch(stream, spec("k", 0), -1);
        receivers.push(rx);
    }
    for rev in 2..200 {
        hub.dispatch(rev, Some(&[put_event("k", rev)]));
    }
    // Each stream may take one message past the total, never more.
    let created = receivers.len() * 20;
    assert!(
        hub.queued_bytes() <= 50 * per_message + 10 * per_message + created,
        "{} queued",
        hub.queued_bytes()
    );
    assert_eq!(hub.inner.lock().unsynced.len(), 10);
    for rx in &mut receivers {
        let got = revisions(rx);
        // What a stream got is a gapless start of the history; the rest comes by catch-up.
        assert_eq!(got, (2..2 + got.len() as i64).collect::<Vec<_>>());
    }
    assert_eq!(hub.queued_bytes(), 0);
}
