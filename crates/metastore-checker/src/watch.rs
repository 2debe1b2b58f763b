//! Watch checks: what one watcher received, against the writes of the history.
//!
//! A watch is not a linearizable operation, but its guarantees are exact once revisions are
//! known: every change in the watched range from the start revision on, in revision order,
//! once each, with the previous state of the key when asked for.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::global::Writes;
use crate::history::{Effect, KeyValue, Operation, Revision};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: Revision,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The key after the event; for a delete etcd sends only its mod revision, so only that is
    /// checked there.
    pub kv: Option<KeyValue>,
    /// Present only when the watch asked for it and the key existed before the event.
    #[serde(default)]
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub key: String,
    /// Watch every key starting with `key`.
    #[serde(default)]
    pub prefix: bool,
    pub start_revision: Revision,
    /// The watch asked for `prev_kv`, so its absence means the key did not exist.
    #[serde(default)]
    pub prev_kv: bool,
}

impl WatchRequest {
    fn matches(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("watch violation{}: {explanation}", event.map(|e| format!(" at event {e}")).unwrap_or_default())]
pub struct WatchViolation {
    /// Index of the offending event, when one event is to blame.
    pub event: Option<usize>,
    pub explanation: String,
}

fn fail(event: Option<usize>, explanation: String) -> Result<(), WatchViolation> {
    Err(WatchViolation { event, explanation })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Put { value: String, lease: i64 },
    Delete,
}

/// Checks that `events` are what a watch described by `request` must deliver given `history`:
/// in revision order, without duplicates, each the effect of a write of the history (an
/// unknown write's revision becomes known by appearing here), with no acknowledged write
/// missing up to the last event, and with correct `prev_kv` and `kv`.
pub fn check_watch(
    history: &[Operation],
    request: &WatchRequest,
    events: &[WatchEvent],
) -> Result<(), WatchViolation> {
    let w = Writes::new(history).map_err(|v| WatchViolation {
        event: None,
        explanation: v.explanation,
    })?;
    // Each key's changes by revision: the acknowledged ones, then those the events reveal.
    let mut timeline: HashMap<&str, BTreeMap<Revision, Change>> = HashMap::new();
    for (&rev, &i) in &w.by_rev {
        let op = &history[i];
        let change = match (&op.input, op.effect()) {
            (crate::Input::Put { lease, .. }, Some(Effect::Put(v))) => Change::Put {
                value: v.to_owned(),
                lease: *lease,
            },
            (_, Some(Effect::Put(v))) => Change::Put {
                value: v.to_owned(),
                lease: 0,
            },
            _ => Change::Delete,
        };
        if let Some(key) = op.key() {
            timeline.entry(key).or_default().insert(rev, change);
        }
    }
    let mut revealed: HashMap<&str, usize> = HashMap::new();
    let mut seen: HashSet<(Revision, &str)> = HashSet::new();
    let mut prev_rev = None;
    for (n, e) in events.iter().enumerate() {
        let here = Some(n);
        if !request.matches(&e.key) {
            fail(
                here,
                format!("key {:?} is outside the watched range", e.key),
            )?;
        }
        if e.revision < request.start_revision {
            fail(
                here,
                format!(
                    "revision {} is before the start revision {}",
                    e.revision, request.start_revision
                ),
            )?;
        }
        if !seen.insert((e.revision, e.key.as_str())) {
            fail(
                here,
                format!("duplicate event for {:?} at revision {}", e.key, e.revision),
            )?;
        }
        if prev_rev.is_some_and(|p| e.revision < p) {
            fail(
                here,
                format!(
                    "revision {} arrives after revision {}",
                    e.revision,
                    prev_rev.unwrap_or(0)
                ),
            )?;
        }
        prev_rev = Some(e.revision);
        let effect = match (&e.kind, &e.kv) {
            (EventType::Put, Some(kv)) => Effect::Put(&kv.value),
            (EventType::Put, None) => {
                return fail(here, "a put event without its key-value pair".into())
            }
            (EventType::Delete, _) => Effect::Delete,
        };
        if let Some(kv) = &e.kv {
            if kv.mod_revision != e.revision {
                fail(
                    here,
                    format!("the event's pair has mod revision {}", kv.mod_revision),
                )?;
            }
        }
        match w.by_rev.get(&e.revision) {
            Some(&i) => {
                if history[i].key() != Some(e.key.as_str()) || history[i].effect() != Some(effect) {
                    fail(
                        here,
                        format!(
                            "revision {} was made by a different write: #{i} {}",
                            e.revision, history[i]
                        ),
                    )?;
                }
            }
            None if w.unknown_could(&e.key, effect, u64::MAX) => {
                *revealed.entry(e.key.as_str()).or_default() += 1;
                let change = match effect {
                    Effect::Put(v) => Change::Put {
                        value: v.to_owned(),
                        lease: e.kv.as_ref().map_or(0, |kv| kv.lease),
                    },
                    Effect::Delete => Change::Delete,
                };
                timeline
                    .entry(e.key.as_str())
                    .or_default()
                    .insert(e.revision, change);
            }
            None => fail(
                here,
                format!(
                    "no write of the history made this event ({:?} at {})",
                    e.key, e.revision
                ),
            )?,
        }
    }
    let Some(last) = prev_rev else { return Ok(()) };
    let mut acked: Vec<(Revision, usize)> = w
        .by_rev
        .iter()
        .filter(|(r, _)| (request.start_revision..=last).contains(*r))
        .map(|(&r, &i)| (r, i))
        .collect();
    acked.sort_unstable();
    for (rev, i) in acked {
        let key = history[i].key().unwrap_or_default();
        if request.matches(key) && !seen.contains(&(rev, key)) {
            fail(
                None,
                format!(
                    "gap: acknowledged #{i} {} is missing before the last event at {last}",
                    history[i]
                ),
            )?;
        }
    }
    for (n, e) in events.iter().enumerate() {
        let line = timeline.get(e.key.as_str());
        // Unknown writes to the key that no event revealed may lie anywhere, so the exact
        // state is only known without them.
        let hidden = w.unknown.get(e.key.as_str()).map_or(0, Vec::len)
            > revealed.get(e.key.as_str()).copied().unwrap_or(0);
        let before = line.and_then(|l| l.range(..e.revision).next_back());
        if request.prev_kv {
            check_prev(&w, e, before, hidden).or_else(|why| fail(Some(n), why))?;
            if !hidden {
                let exact = line.and_then(|l| replay(l, e.revision - 1));
                if exact != e.prev_kv {
                    fail(
                        Some(n),
                        format!("prev_kv {:?} but the key was {exact:?}", e.prev_kv),
                    )?;
                }
            }
        }
        if let (EventType::Put, Some(kv), false) = (e.kind, &e.kv, hidden) {
            let exact = line.and_then(|l| replay(l, e.revision));
            if exact.as_ref() != Some(kv) {
                fail(
                    Some(n),
                    format!("the event's pair {kv} but the key became {exact:?}"),
                )?;
            }
        }
    }
    Ok(())
}

/// What can be said about `prev_kv` even when unknown writes leave the exact state open.
fn check_prev(
    w: &Writes<'_>,
    e: &WatchEvent,
    before: Option<(&Revision, &Change)>,
    hidden: bool,
) -> Result<(), String> {
    match (&e.prev_kv, before) {
        (Some(p), _) if p.mod_revision >= e.revision => Err(format!(
            "prev_kv has mod revision {} not before the event",
            p.mod_revision
        )),
        (Some(p), Some((&r, _))) if r > p.mod_revision => Err(format!(
            "prev_kv is {p}, but the key changed again at {r} before the event"
        )),
        (Some(p), Some((&r, c))) if r == p.mod_revision => match c {
            Change::Put { value, .. } if *value == p.value => Ok(()),
            _ => Err(format!("prev_kv is {p}, but revision {r} wrote {c:?}")),
        },
        (Some(p), _)
            if hidden
                && w.unknown_could(&e.key, Effect::Put(&p.value), u64::MAX)
                && !w.by_rev.contains_key(&p.mod_revision) =>
        {
            Ok(())
        }
        (Some(p), _) => Err(format!(
            "prev_kv is {p}, which no write of the key explains"
        )),
        (None, Some((&r, Change::Put { value, .. })))
            if !hidden || !w.unknown_could(&e.key, Effect::Delete, u64::MAX) =>
        {
            Err(format!(
                "prev_kv is missing, but the key held {value:?} since revision {r}"
            ))
        }
        (None, _) => Ok(()),
    }
}

fn replay(line: &BTreeMap<Revision, Change>, to: Revision) -> Option<KeyValue> {
    let mut kv: Option<KeyValue> = None;
    for (&r, c) in line.range(..=to) {
        kv = match c {
            Change::Delete => None,
            Change::Put { value, lease } => {
                let (create, version) = kv.map_or((r, 1), |p| (p.create_revision, p.version + 1));
                Some(KeyValue {
                    value: value.clone(),
                    mod_revision: r,
                    create_revision: create,
                    version,
                    lease: *lease,
                })
            }
        };
    }
    kv
}

/// Checks a watch resumed at `resumed_from` (after `first` broke off): each must pass
/// [`check_watch`], and over the revisions both cover they must carry exactly the same events.
pub fn check_resumed_watch(
    history: &[Operation],
    request: &WatchRequest,
    first: &[WatchEvent],
    resumed_from: Revision,
    resumed: &[WatchEvent],
) -> Result<(), WatchViolation> {
    check_watch(history, request, first)?;
    let again = WatchRequest {
        start_revision: resumed_from,
        ..request.clone()
    };
    check_watch(history, &again, resumed).map_err(|v| WatchViolation {
        explanation: format!("in the resumed watch: {}", v.explanation),
        ..v
    })?;
    let (Some(a), Some(b)) = (first.last(), resumed.last()) else {
        return Ok(());
    };
    let end = a.revision.min(b.revision);
    let window = |es: &[WatchEvent]| -> Vec<WatchEvent> {
        es.iter()
            .filter(|e| (resumed_from..=end).contains(&e.revision))
            .cloned()
            .collect()
    };
    let (x, y) = (window(first), window(resumed));
    if let Some(n) = (0..x.len().max(y.len())).find(|&n| x.get(n) != y.get(n)) {
        fail(
            None,
            format!(
                "resumed from {resumed_from}, event {n} of revisions {resumed_from}..={end} differs: first watch {:?}, resumed {:?}",
                x.get(n),
                y.get(n)
            ),
        )?;
    }
    Ok(())
}
