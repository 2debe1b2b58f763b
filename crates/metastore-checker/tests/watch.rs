mod common;

use common::{del, event, kv, put, put_unknown};
use metastore_checker::{check_resumed_watch, check_watch, Operation, WatchEvent, WatchRequest};

fn history() -> Vec<Operation> {
    vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 30, "x", "b", 2),
        put(2, 25, 35, "y", "c", 3),
        del(1, 40, 50, "x", 4, 1),
        // Unknown to the client; the watch reveals it landed at 5.
        put_unknown(3, 55, "x", "d"),
        put(1, 60, 70, "x", "e", 6),
    ]
}

fn events() -> Vec<WatchEvent> {
    vec![
        event(1, "x", Some(kv("a", 1, 1, 1)), None),
        event(2, "x", Some(kv("b", 2, 1, 2)), Some(kv("a", 1, 1, 1))),
        event(4, "x", None, Some(kv("b", 2, 1, 2))),
        event(5, "x", Some(kv("d", 5, 5, 1)), None),
        event(6, "x", Some(kv("e", 6, 5, 2)), Some(kv("d", 5, 5, 1))),
    ]
}

fn request(start_revision: i64) -> WatchRequest {
    WatchRequest {
        key: "x".into(),
        prefix: false,
        start_revision,
        prev_kv: true,
    }
}

#[track_caller]
fn assert_violation(events: &[WatchEvent], needle: &str) {
    match check_watch(&history(), &request(1), events) {
        Ok(()) => panic!("expected a violation mentioning {needle:?}"),
        Err(v) => assert!(v.to_string().contains(needle), "{v}"),
    }
}

#[test]
fn complete_watch_passes() {
    check_watch(&history(), &request(1), &events()).expect("a correct watch");
    // Without prev_kv requested, absent prev_kv says nothing.
    let plain: Vec<WatchEvent> = events()
        .into_iter()
        .map(|e| WatchEvent { prev_kv: None, ..e })
        .collect();
    let req = WatchRequest {
        prev_kv: false,
        ..request(1)
    };
    check_watch(&history(), &req, &plain).expect("a correct watch without prev_kv");
}

#[test]
fn prefix_watch_sees_every_key() {
    let mut all = events();
    all.insert(2, event(3, "y", Some(kv("c", 3, 3, 1)), None));
    let req = WatchRequest {
        key: String::new(),
        prefix: true,
        ..request(1)
    };
    check_watch(&history(), &req, &all).expect("a correct prefix watch");
    // The exact-key watch must not carry y.
    assert_violation(&all, "outside the watched range");
}

#[test]
fn gap_fails() {
    let mut es = events();
    es.remove(1);
    assert_violation(&es, "gap");
}

#[test]
fn duplicate_fails() {
    let mut es = events();
    es.insert(2, es[1].clone());
    assert_violation(&es, "duplicate");
}

#[test]
fn out_of_order_fails() {
    let mut es = events();
    es.swap(1, 2);
    assert_violation(&es, "arrives after");
}

#[test]
fn wrong_prev_kv_fails() {
    let mut es = events();
    es[1].prev_kv = Some(kv("a", 1, 1, 2));
    assert_violation(&es, "prev_kv");
    let mut es = events();
    es[1].prev_kv = None;
    assert_violation(&es, "prev_kv");
    let mut es = events();
    es[3].prev_kv = Some(kv("b", 2, 1, 2));
    assert_violation(&es, "prev_kv");
}

#[test]
fn event_for_a_write_never_made_fails() {
    let mut es = events();
    es[3] = event(5, "x", Some(kv("zzz", 5, 5, 1)), None);
    assert_violation(&es, "no write");
    let mut es = events();
    es.push(event(
        7,
        "x",
        Some(kv("f", 7, 5, 3)),
        Some(kv("e", 6, 5, 2)),
    ));
    assert_violation(&es, "no write");
}

#[test]
fn wrong_event_kv_fails() {
    let mut es = events();
    es[4].kv = Some(kv("e", 6, 5, 7));
    assert_violation(&es, "pair");
}

#[test]
fn resumed_watch_must_repeat_the_same_events() {
    let all = events();
    let first = &all[..3];
    check_resumed_watch(&history(), &request(1), first, 4, &all[2..]).expect("same events");
    check_resumed_watch(&history(), &request(1), &all, 2, &all[1..]).expect("same events");
    // Resuming at 2 but skipping the event at 2 is a gap in the resumed watch.
    let err = check_resumed_watch(&history(), &request(1), &all, 2, &all[2..]).expect_err("gap");
    assert!(err.to_string().contains("resumed"), "{err}");
}
