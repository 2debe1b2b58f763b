//! Histories generated from a reference store are linearizable by construction, so the checker
//! must never reject one (nor time out on these small ones).

mod common;

use std::time::Duration;

use common::Reference;
use metastore_checker::{
    check, check_resumed_watch, check_watch, CheckResult, Input, Operation, Outcome, Response,
    WatchRequest,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
struct Spec {
    kind: u8,
    key: u8,
    value: u8,
    /// 0..=7: 6 means the request timed out after taking effect, 7 that it never arrived.
    fate: u8,
    lead: u64,
    lag: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (0u8..6, 0u8..3, 0u8..6, 0u8..8, 0u64..40, 0u64..40).prop_map(
        |(kind, key, value, fate, lead, lag)| Spec {
            kind,
            key,
            value,
            fate,
            lead,
            lag,
        },
    )
}

/// Runs the specs against the reference store in order; each op's interval contains its
/// point in that order. The first `sequential` ops do not overlap; the rest overlap up to
/// several neighbours either side.
fn generate(specs: &[Spec], sequential: usize) -> (Vec<Operation>, Reference) {
    let mut store = Reference::default();
    let mut history = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let key = format!("k{}", s.key);
        let value = format!("v{i}-{}", s.value);
        let input = match s.kind {
            0 => Input::Put {
                key,
                value,
                lease: if s.value == 5 { 7 } else { 0 },
            },
            1 => Input::Get {
                key,
                serializable: false,
            },
            2 => Input::Get {
                key,
                serializable: true,
            },
            3 => Input::Delete { key },
            4 => {
                // Half the time the expectation holds, half the time it is one off.
                let current = store.mod_revision(&key);
                Input::CasPut {
                    expected_mod_revision: current + i64::from(s.value % 2),
                    key,
                    value,
                }
            }
            _ => Input::LeaseGrant {
                id: i64::from(s.value),
            },
        };
        let point = 100_000 + 1_000 * i as u64;
        let (call, ret) = if i < sequential {
            (point - 100, point + 100)
        } else {
            (point - 100 * s.lead - 1, point + 100 * s.lag + 1)
        };
        let outcome = match s.fate {
            7 => Outcome::Unknown,
            6 => {
                store.apply(&input, 0);
                Outcome::Unknown
            }
            _ => Outcome::Ok(store.apply(&input, i64::from(s.value % 3))),
        };
        history.push(Operation {
            client: i as u64,
            call,
            ret,
            input,
            outcome,
        });
    }
    (history, store)
}

fn history_and_split() -> impl Strategy<Value = (Vec<Spec>, usize)> {
    prop::collection::vec(spec(), 1..45).prop_flat_map(|specs| {
        let n = specs.len();
        (Just(specs), 0..=n)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_histories_are_linearizable((specs, sequential) in history_and_split()) {
        let (history, _) = generate(&specs, sequential);
        let verdict = check(&history, Duration::from_secs(20)).expect("valid");
        prop_assert_eq!(verdict, CheckResult::Linearizable);
    }

    #[test]
    fn generated_watches_pass((specs, sequential) in history_and_split(), start in 1i64..10, resume in 1i64..40) {
        let (history, store) = generate(&specs, sequential);
        let request = WatchRequest { key: "k".into(), prefix: true, start_revision: start, prev_kv: true };
        let from = |r: i64| store.events.iter().filter(|e| e.revision >= r).cloned().collect::<Vec<_>>();
        let events = from(start);
        if let Err(v) = check_watch(&history, &request, &events) {
            return Err(TestCaseError::fail(v.to_string()));
        }
        let resumed_from = start.max(resume);
        if let Err(v) = check_resumed_watch(&history, &request, &events, resumed_from, &from(resumed_from)) {
            return Err(TestCaseError::fail(v.to_string()));
        }
    }
}

/// The generator is only useful if it can produce histories the checker rejects once an
/// answer is tampered with: make one stale read and expect a failure.
#[test]
fn tampered_generated_history_fails() {
    let specs: Vec<Spec> = (0..20)
        .map(|i| Spec {
            kind: if i % 2 == 0 { 0 } else { 1 },
            key: 0,
            value: 0,
            fate: 0,
            lead: 0,
            lag: 0,
        })
        .collect();
    let (mut history, _) = generate(&specs, 20);
    // Op 5 reads what op 4 wrote; make it return what op 2 wrote instead.
    let stale = history[3].outcome.clone();
    history[5].outcome = stale;
    let verdict = check(&history, Duration::from_secs(5)).expect("valid");
    assert!(
        matches!(verdict, CheckResult::NotLinearizable { .. }),
        "{verdict:?}"
    );
}

/// Larger, denser histories than proptest makes: many overlapping clients, a tenth of the
/// requests unknown (half of those applied). They must pass, and well within the limit: a
/// checker that says Unknown here would be of little use on real test runs.
fn random_history(
    rng: &mut StdRng,
    n: usize,
    keys: u8,
    overlap: u64,
    unknown_pct: u32,
) -> Vec<Operation> {
    let mut store = Reference::default();
    let mut history = Vec::new();
    for i in 0..n {
        let key = format!("k{}", rng.random_range(0..keys));
        let value = format!("v{i}");
        let input = match rng.random_range(0..5) {
            0 | 1 => Input::Put {
                key,
                value,
                lease: 0,
            },
            2 => Input::Get {
                key,
                serializable: false,
            },
            3 => Input::Delete { key },
            _ => {
                let current = store.mod_revision(&key);
                Input::CasPut {
                    expected_mod_revision: current + rng.random_range(0..2),
                    key,
                    value,
                }
            }
        };
        let point = 1_000_000 + 1_000 * i as u64;
        let call = point - rng.random_range(1..overlap * 1_000);
        let ret = point + rng.random_range(1..overlap * 1_000);
        let roll = rng.random_range(0..100);
        let outcome = if roll < unknown_pct / 2 {
            Outcome::Unknown
        } else if roll < unknown_pct {
            store.apply(&input, 0);
            Outcome::Unknown
        } else {
            Outcome::Ok(store.apply(&input, 0))
        };
        history.push(Operation {
            client: i as u64,
            call,
            ret,
            input,
            outcome,
        });
    }
    history
}

#[test]
fn dense_histories_pass_quickly() {
    let mut rng = StdRng::seed_from_u64(1);
    for (n, keys, overlap, unknown) in [(1000, 3, 10, 10), (500, 1, 20, 10), (300, 1, 8, 30)] {
        let history = random_history(&mut rng, n, keys, overlap, unknown);
        let verdict = check(&history, Duration::from_secs(60)).expect("valid");
        assert_eq!(
            verdict,
            CheckResult::Linearizable,
            "n={n} keys={keys} overlap={overlap}"
        );
    }
}

/// Replacing one read's answer with another acknowledged write of the same key (value and
/// revision both real, so only the order gives it away) must be caught every time it
/// actually changes the answer.
#[test]
fn substituted_reads_in_dense_histories_fail() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut tried = 0;
    for _ in 0..40 {
        let mut history = random_history(&mut rng, 120, 2, 5, 10);
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| {
                matches!(
                    &history[i].outcome,
                    Outcome::Ok(Response::Get { kv: Some(_), .. })
                )
            })
            .collect();
        if reads.is_empty() {
            continue;
        }
        let r = reads[rng.random_range(0..reads.len())];
        let key = history[r].key().map(str::to_owned);
        let writes: Vec<(String, i64)> = history
            .iter()
            .filter(|o| o.key().map(str::to_owned) == key)
            .filter_map(|o| match (&o.input, &o.outcome) {
                (Input::Put { value, .. }, Outcome::Ok(Response::Put { header_revision })) => {
                    Some((value.clone(), *header_revision))
                }
                _ => None,
            })
            .collect();
        let Outcome::Ok(Response::Get { kv: Some(kv), .. }) = &mut history[r].outcome else {
            continue;
        };
        let others: Vec<&(String, i64)> = writes.iter().filter(|(v, _)| *v != kv.value).collect();
        if others.is_empty() {
            continue;
        }
        let (value, rev) = others[rng.random_range(0..others.len())].clone();
        kv.value = value;
        kv.mod_revision = rev;
        tried += 1;
        let verdict = check(&history, Duration::from_secs(60)).expect("valid");
        assert!(
            matches!(verdict, CheckResult::NotLinearizable { .. }),
            "{verdict:?}"
        );
    }
    assert!(
        tried > 20,
        "the mutation found too few reads to alter: {tried}"
    );
}
