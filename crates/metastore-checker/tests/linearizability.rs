mod common;

use std::time::Duration;

use common::{cas, del, get, kv, put, put_unknown, sget};
use metastore_checker::{
    check, read_jsonl, write_jsonl, CheckResult, HistoryError, Input, Operation, Outcome, Response,
};

fn verdict(history: &[Operation]) -> CheckResult {
    check(history, Duration::from_secs(10)).expect("a valid history")
}

#[track_caller]
fn assert_pass(history: &[Operation]) {
    let v = verdict(history);
    assert_eq!(v, CheckResult::Linearizable, "{v:#?}");
}

/// Asserts a failure and returns its explanation, printed so a failing run shows it.
#[track_caller]
fn assert_fail(history: &[Operation], key: Option<&str>) -> String {
    match verdict(history) {
        CheckResult::NotLinearizable {
            key: k,
            explanation,
        } => {
            println!("{explanation}");
            assert_eq!(k.as_deref(), key, "{explanation}");
            explanation
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn concurrent_history_with_unknown_writes_passes() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        get(2, 5, 15, "x", 1, Some(kv("a", 1, 1, 1))),
        // Times out, but lands later: a read reveals it at revision 3.
        put_unknown(3, 20, "x", "b"),
        put(1, 12, 30, "y", "p", 2),
        get(2, 40, 50, "x", 3, Some(kv("b", 3, 1, 2))),
        // Times out and never lands.
        put_unknown(4, 45, "y", "never"),
        get(1, 60, 70, "y", 3, Some(kv("p", 2, 2, 1))),
        put(2, 55, 80, "x", "c", 4),
        get(3, 56, 58, "x", 3, Some(kv("b", 3, 1, 2))),
        get(5, 60, 90, "x", 4, Some(kv("c", 4, 1, 3))),
    ];
    assert_pass(&h);
}

#[test]
fn concurrent_read_may_see_either_side_of_a_write() {
    let before = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 40, "x", "b", 2),
        get(2, 25, 35, "x", 1, Some(kv("a", 1, 1, 1))),
    ];
    assert_pass(&before);
    let after = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 40, "x", "b", 2),
        get(2, 25, 35, "x", 2, Some(kv("b", 2, 1, 2))),
    ];
    assert_pass(&after);
}

#[test]
fn stale_read_fails() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 30, "x", "b", 2),
        // Called after b was acknowledged, yet sees a.
        get(2, 40, 50, "x", 2, Some(kv("a", 1, 1, 1))),
    ];
    let why = assert_fail(&h, Some("x"));
    assert!(why.contains("Longest valid order"), "{why}");
}

#[test]
fn stale_read_with_an_old_header_fails_on_revisions() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 30, "x", "b", 2),
        get(2, 40, 50, "x", 1, Some(kv("a", 1, 1, 1))),
    ];
    let why = assert_fail(&h, Some("x"));
    assert!(why.contains("real time"), "{why}");
}

#[test]
fn lost_acknowledged_write_fails() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 15, 20, "y", "z", 2),
        get(2, 30, 40, "x", 2, None),
    ];
    assert_fail(&h, Some("x"));
}

#[test]
fn missing_write_explained_by_an_unknown_delete_passes() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 15, 20, "y", "z", 2),
        Operation {
            client: 3,
            call: 25,
            ret: 0,
            input: Input::Delete { key: "x".into() },
            outcome: Outcome::Unknown,
        },
        get(2, 30, 40, "x", 3, None),
    ];
    assert_pass(&h);
}

#[test]
fn read_of_a_value_never_written_fails() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        get(2, 20, 30, "x", 1, Some(kv("ghost", 1, 1, 1))),
    ];
    let why = assert_fail(&h, Some("x"));
    assert!(why.contains("different write"), "{why}");
    let h = vec![get(2, 20, 30, "x", 1, Some(kv("ghost", 1, 1, 1)))];
    let why = assert_fail(&h, Some("x"));
    assert!(why.contains("never written"), "{why}");
    let h = vec![sget(2, 20, 30, "x", 1, Some(kv("ghost", 1, 1, 1)))];
    assert_fail(&h, Some("x"));
}

#[test]
fn unknown_write_cannot_take_a_revision_another_write_holds() {
    let h = vec![
        put_unknown(1, 0, "x", "b"),
        put(2, 0, 10, "y", "c", 1),
        get(3, 20, 30, "x", 1, Some(kv("b", 1, 1, 1))),
    ];
    assert_fail(&h, Some("x"));
}

#[test]
fn cas_both_branches() {
    let h = vec![
        cas(1, 0, 10, "x", 0, "a", 1, true, None),
        cas(1, 20, 30, "x", 1, "b", 2, true, None),
        cas(2, 40, 50, "x", 1, "c", 2, false, Some(kv("b", 2, 1, 2))),
        get(3, 60, 70, "x", 2, Some(kv("b", 2, 1, 2))),
    ];
    assert_pass(&h);

    let succeeded_on_a_stale_revision = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 20, 30, "x", "b", 2),
        cas(2, 40, 50, "x", 1, "c", 3, true, None),
    ];
    let why = assert_fail(&succeeded_on_a_stale_revision, Some("x"));
    assert!(why.contains("CAS comparison"), "{why}");

    let failed_although_it_matched = vec![
        put(1, 0, 10, "x", "a", 1),
        cas(2, 20, 30, "x", 1, "c", 1, false, Some(kv("a", 1, 1, 1))),
    ];
    assert_fail(&failed_although_it_matched, Some("x"));

    let create_on_existing_key = vec![
        put(1, 0, 10, "x", "a", 1),
        cas(2, 20, 30, "x", 0, "c", 2, true, None),
    ];
    assert_fail(&create_on_existing_key, Some("x"));
}

#[test]
fn revision_going_back_across_real_time_fails() {
    let h = vec![put(1, 0, 10, "x", "a", 5), put(2, 20, 30, "y", "b", 3)];
    let why = assert_fail(&h, Some("y"));
    assert!(why.contains("real time"), "{why}");
    // A read of another key started after a write completed cannot report an older store.
    let h = vec![put(1, 0, 10, "x", "a", 2), get(2, 20, 30, "y", 1, None)];
    assert_fail(&h, Some("y"));
    let h = vec![put(1, 0, 10, "x", "a", 2), put(2, 5, 30, "y", "b", 2)];
    let why = assert_fail(&h, Some("y"));
    assert!(why.contains("share revision"), "{why}");
}

#[test]
fn delete_semantics() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put(1, 11, 12, "x", "a2", 2),
        del(1, 20, 30, "x", 3, 1),
        // Deleting a missing key does not raise the revision.
        del(1, 40, 50, "x", 3, 0),
        put(1, 60, 70, "x", "b", 4),
        // The version starts again after the delete.
        get(2, 80, 90, "x", 4, Some(kv("b", 4, 4, 1))),
    ];
    assert_pass(&h);
    let mut wrong_version = h.clone();
    wrong_version[5] = get(2, 80, 90, "x", 4, Some(kv("b", 4, 4, 3)));
    assert_fail(&wrong_version, Some("x"));
    let mut wrong_create = h.clone();
    wrong_create[5] = get(2, 80, 90, "x", 4, Some(kv("b", 4, 1, 1)));
    assert_fail(&wrong_create, Some("x"));
    let mut deleted_twice = h;
    deleted_twice[3] = del(1, 40, 50, "x", 4, 1);
    deleted_twice[4] = put(1, 60, 70, "x", "b", 5);
    deleted_twice[5] = get(2, 80, 90, "x", 5, Some(kv("b", 5, 5, 1)));
    assert_fail(&deleted_twice, Some("x"));
}

#[test]
fn serializable_reads_may_be_stale_but_consistent() {
    let base = || vec![put(1, 0, 10, "x", "a", 1), put(1, 20, 30, "x", "b", 2)];
    let mut stale = base();
    stale.push(sget(2, 40, 50, "x", 1, Some(kv("a", 1, 1, 1))));
    assert_pass(&stale);
    // At header 2 the key held b, not a.
    let mut inconsistent = base();
    inconsistent.push(sget(2, 40, 50, "x", 2, Some(kv("a", 1, 1, 1))));
    assert_fail(&inconsistent, Some("x"));
    let mut wrong_version = base();
    wrong_version.push(sget(2, 40, 50, "x", 1, Some(kv("a", 1, 1, 2))));
    assert_fail(&wrong_version, Some("x"));
    let mut absent_too_late = base();
    absent_too_late.push(sget(2, 40, 50, "x", 2, None));
    assert_fail(&absent_too_late, Some("x"));
    let mut absent_early = base();
    absent_early.push(sget(2, 40, 50, "x", 0, None));
    assert_pass(&absent_early);
}

#[test]
fn failure_is_shrunk_to_the_shortest_failing_prefix() {
    let mut h = vec![
        put(1, 0, 10, "x", "v1", 1),
        put(1, 20, 30, "x", "v2", 2),
        get(2, 40, 50, "x", 2, Some(kv("v1", 1, 1, 1))),
    ];
    for i in 3..40 {
        let t = 60 + 20 * i as u64;
        h.push(put(1, t, t + 10, "x", &format!("v{i}"), i));
    }
    let why = assert_fail(&h, Some("x"));
    assert!(why.contains("the 3 operations called by t=50"), "{why}");
}

#[test]
fn pathological_history_with_no_time_is_unknown() {
    let mut h = Vec::new();
    for i in 0..60u64 {
        h.push(put_unknown(i, i, "x", &format!("v{i}")));
    }
    for i in 0..30u64 {
        let v = format!("v{}", 59 - i);
        h.push(get(
            100 + i,
            100 + i,
            10_000,
            "x",
            100,
            Some(kv(&v, 50 + i as i64, 3, 1 + i as i64)),
        ));
    }
    assert_eq!(
        check(&h, Duration::ZERO).expect("valid"),
        CheckResult::Unknown
    );
}

#[test]
fn history_round_trips_through_json_lines() {
    let h = vec![
        put(1, 0, 10, "x", "a", 1),
        put_unknown(2, 5, "x", "b"),
        cas(3, 20, 30, "x", 1, "c", 2, true, None),
        sget(1, 40, 50, "x", 2, Some(kv("c", 2, 1, 2))),
        Operation {
            client: 4,
            call: 60,
            ret: 70,
            input: Input::LeaseGrant { id: 7 },
            outcome: Outcome::Ok(Response::LeaseGrant { header_revision: 2 }),
        },
    ];
    let mut buf = Vec::new();
    write_jsonl(&h, &mut buf).expect("write");
    let back = read_jsonl(buf.as_slice()).expect("read");
    assert_eq!(back, h);
    assert_pass(&back);
}

#[test]
fn malformed_history_is_an_error_not_a_verdict() {
    let mut bad = get(1, 0, 10, "x", 0, None);
    bad.outcome = Outcome::Ok(Response::Put { header_revision: 1 });
    assert!(matches!(
        check(&[bad], Duration::from_secs(1)),
        Err(HistoryError::Invalid { index: 0, .. })
    ));
    let backwards = put(1, 10, 5, "x", "a", 1);
    assert!(check(&[backwards], Duration::from_secs(1)).is_err());
}
