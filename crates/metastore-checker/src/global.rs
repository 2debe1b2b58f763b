//! The checks that cross keys: the global revision. The per-key searches each see one key, so
//! what ties keys together (one revision counter, raised in real-time order) is checked here,
//! along with serializable reads, which are not linearizable and stay out of the searches.

use std::collections::{BTreeMap, HashMap};

use crate::history::{Effect, Input, KeyValue, Operation, Response, Revision};

pub(crate) struct Violation {
    pub key: Option<String>,
    pub explanation: String,
}

fn violation(key: Option<&str>, explanation: String) -> Result<(), Violation> {
    Err(Violation {
        key: key.map(str::to_owned),
        explanation,
    })
}

/// Acknowledged writes by revision, and unknown writes by key.
pub(crate) struct Writes<'h> {
    pub history: &'h [Operation],
    pub by_rev: HashMap<Revision, usize>,
    pub by_key: HashMap<&'h str, BTreeMap<Revision, usize>>,
    pub unknown: HashMap<&'h str, Vec<usize>>,
}

impl<'h> Writes<'h> {
    pub fn new(history: &'h [Operation]) -> Result<Self, Violation> {
        let mut w = Writes {
            history,
            by_rev: HashMap::new(),
            by_key: HashMap::new(),
            unknown: HashMap::new(),
        };
        for (i, op) in history.iter().enumerate() {
            let Some(key) = op.key() else { continue };
            if op.is_unknown() && op.effect().is_some() {
                w.unknown.entry(key).or_default().push(i);
            }
            let Some(rev) = op.write_revision() else {
                continue;
            };
            if let Some(&other) = w.by_rev.get(&rev) {
                violation(
                    Some(key),
                    format!(
                        "two acknowledged writes share revision {rev}:\n  #{other} {}\n  #{i} {op}",
                        history[other]
                    ),
                )?;
            }
            w.by_rev.insert(rev, i);
            w.by_key.entry(key).or_default().insert(rev, i);
        }
        Ok(w)
    }

    /// An unknown write to `key` with `effect`, called by `by`, which could explain a
    /// revision no acknowledged write holds.
    pub fn unknown_could(&self, key: &str, effect: Effect<'_>, by: u64) -> bool {
        self.unknown.get(key).is_some_and(|ops| {
            ops.iter().any(|&i| {
                let op = &self.history[i];
                op.call <= by
                    && match (op.effect(), effect) {
                        (Some(Effect::Put(a)), Effect::Put(b)) => a == b,
                        (Some(Effect::Delete), Effect::Delete) => true,
                        _ => false,
                    }
            })
        })
    }

    /// The key's state at `rev` from its acknowledged writes alone; exact only when the key has
    /// no unknown writes.
    pub fn replay(&self, key: &str, rev: Revision) -> Option<KeyValue> {
        let mut kv: Option<KeyValue> = None;
        for (&r, &i) in self.by_key.get(key)?.range(..=rev) {
            kv = match &self.history[i].input {
                Input::Delete { .. } => None,
                Input::Put { value, lease, .. } => Some(put(kv, value, *lease, r)),
                Input::CasPut { value, .. } => Some(put(kv, value, 0, r)),
                _ => kv,
            };
        }
        kv
    }
}

fn put(prev: Option<KeyValue>, value: &str, lease: i64, rev: Revision) -> KeyValue {
    let (create, version) = prev.map_or((rev, 1), |p| (p.create_revision, p.version + 1));
    KeyValue {
        value: value.to_owned(),
        mod_revision: rev,
        create_revision: create,
        version,
        lease,
    }
}

/// Real-time order of revisions: a write gets a revision above every header revision returned
/// before it was called, and any other linearizable response one at least as high. Serializable
/// reads may be served by a lagging member, so they are left out.
pub(crate) fn check_real_time(history: &[Operation]) -> Result<(), Violation> {
    let mut resp: Vec<(usize, Revision)> = history
        .iter()
        .enumerate()
        .filter(|(_, op)| !op.is_serializable_read())
        .filter_map(|(i, op)| Some((i, op.header_revision()?)))
        .collect();
    let mut by_ret = resp.clone();
    by_ret.sort_by_key(|&(i, _)| history[i].ret);
    resp.sort_by_key(|&(i, _)| history[i].call);
    let mut done = 0;
    let mut max: Option<(Revision, usize)> = None;
    for &(b, header) in &resp {
        let call = history[b].call;
        while done < by_ret.len() && history[by_ret[done].0].ret < call {
            let (a, h) = by_ret[done];
            if max.is_none_or(|(m, _)| h > m) {
                max = Some((h, a));
            }
            done += 1;
        }
        let Some((m, a)) = max else { continue };
        let write = history[b].write_revision().is_some();
        if header < m || (write && header == m) {
            let what = if write {
                "a write's revision"
            } else {
                "a header revision"
            };
            violation(
                history[b].key(),
                format!(
                    "revision order breaks real time: {what} ({header}) is not above revision {m}, \
                     returned before it was called:\n  #{a} {}\n  #{b} {}",
                    history[a], history[b]
                ),
            )?;
        }
    }
    Ok(())
}

/// Every key-value pair a read reports must come from a write: the acknowledged write holding
/// its mod revision, or an unknown write to that key with that value called before the read
/// returned. This is also what catches a read of a value never written, serializable or not.
pub(crate) fn check_observed(w: &Writes<'_>) -> Result<(), Violation> {
    for (i, op) in w.history.iter().enumerate() {
        let (Some(kv), Some(key), Some(header)) =
            (op.observed_kv(), op.key(), op.header_revision())
        else {
            continue;
        };
        let bad = |why: String| violation(Some(key), format!("#{i} {op}\n  {why}"));
        if kv.mod_revision > header
            || kv.create_revision > kv.mod_revision
            || kv.create_revision <= 0
        {
            bad("the revisions in the key-value pair are inconsistent with each other or the header".into())?;
        }
        if kv.version < 1 {
            bad("a present key has a version below 1".into())?;
        }
        let by = op.effective_return();
        match w.by_rev.get(&kv.mod_revision) {
            Some(&j) => {
                let writer = &w.history[j];
                if writer.key() != Some(key) || writer.effect() != Some(Effect::Put(&kv.value)) {
                    bad(format!(
                        "revision {} was made by a different write: #{j} {writer}",
                        kv.mod_revision
                    ))?;
                }
            }
            None if w.unknown_could(key, Effect::Put(&kv.value), by) => {}
            None => bad(format!(
                "no write of {:?} to {key:?} could have made revision {}: a value never written",
                kv.value, kv.mod_revision
            ))?,
        }
        match w.by_rev.get(&kv.create_revision) {
            Some(&j) => {
                let writer = &w.history[j];
                if writer.key() != Some(key) || !matches!(writer.effect(), Some(Effect::Put(_))) {
                    bad(format!(
                        "create revision {} was made by a different write: #{j} {writer}",
                        kv.create_revision
                    ))?;
                }
            }
            None => {
                let any_put = w.unknown.get(key).is_some_and(|ops| {
                    ops.iter().any(|&u| {
                        w.history[u].call <= by
                            && matches!(w.history[u].effect(), Some(Effect::Put(_)))
                    })
                });
                if !any_put {
                    bad(format!(
                        "no write to {key:?} could have made create revision {}",
                        kv.create_revision
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// A serializable read must return the key as it was at the read's header revision, as far as
/// the history's revisions tell: no acknowledged write to the key between the returned mod
/// revision and the header, and exactly the replayed state when the key has no unknown writes.
pub(crate) fn check_serializable(w: &Writes<'_>) -> Result<(), Violation> {
    for (i, op) in w.history.iter().enumerate() {
        let (
            Input::Get {
                key,
                serializable: true,
            },
            Some(Response::Get {
                header_revision,
                kv,
            }),
        ) = (&op.input, op.response())
        else {
            continue;
        };
        let h = *header_revision;
        let bad = |why: String| violation(Some(key), format!("#{i} {op}\n  {why}"));
        let writes = w.by_key.get(key.as_str());
        let latest = writes.and_then(|ws| ws.range(..=h).next_back());
        match (kv, latest) {
            (Some(kv), Some((&r, &j))) if r > kv.mod_revision => bad(format!(
                "the key changed at revision {r} (#{j} {}), after the returned pair and by the header",
                w.history[j]
            ))?,
            (None, Some((&r, &j)))
                if w.history[j].effect() != Some(Effect::Delete)
                    && !w.unknown_could(key, Effect::Delete, op.effective_return()) =>
            {
                bad(format!(
                    "the key was absent, but #{j} {} wrote it at {r} and no delete could follow by the header",
                    w.history[j]
                ))?
            }
            _ => {}
        }
        if !w.unknown.contains_key(key.as_str()) {
            let expected = w.replay(key, h);
            if expected != *kv {
                let show = |kv: &Option<KeyValue>| {
                    kv.as_ref().map_or("<none>".to_owned(), |kv| kv.to_string())
                };
                bad(format!(
                    "at revision {h} the key's acknowledged writes give {}",
                    show(&expected)
                ))?;
            }
        }
    }
    Ok(())
}
