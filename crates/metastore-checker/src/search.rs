//! Wing–Gong search over one key's operations, memoised on (linearized set, model state) as
//! in porcupine, plus the shrinking of a failure to its shortest failing prefix.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Instant;

use crate::history::{Input, Operation, Response};
use crate::model::{step, CasResult, KeyOpKind, KeyState, ObservedKv, Rev, Revisions};

#[derive(Clone, Debug)]
pub(crate) struct KeyOp {
    pub call: u64,
    /// `u64::MAX` for unknown outcomes.
    pub ret: u64,
    pub kind: KeyOpKind,
    /// Index in the whole history, for explanations.
    pub origin: usize,
    /// Unknown writes that are interchangeable with the others of their class (see
    /// [`bound_observed_unknowns`]): 0 for puts, 1 for deletes.
    pub fungible: Option<usize>,
}

impl KeyOp {
    fn completed(&self) -> bool {
        self.ret != u64::MAX
    }
}

#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    values: Vec<String>,
}

impl Interner {
    fn get(&mut self, v: &str) -> u32 {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.values.push(v.to_owned());
        self.ids.insert(v.to_owned(), id);
        id
    }

    fn observed(&mut self, kv: &Option<crate::KeyValue>) -> Option<ObservedKv> {
        kv.as_ref()
            .map(|kv| ObservedKv::new(kv, self.get(&kv.value)))
    }
}

/// One key's operations in the form the search needs, with the key's values interned.
pub(crate) struct KeyHistory {
    pub ops: Vec<KeyOp>,
    values: Vec<String>,
}

impl KeyHistory {
    /// Takes the operations at `indices` (all on one key). Serializable and unknown reads are
    /// left out: they are not linearizable, or tell nothing.
    pub fn new(history: &[Operation], indices: &[usize]) -> Self {
        let mut interner = Interner::default();
        let mut ops = Vec::new();
        for &origin in indices {
            let op = &history[origin];
            let resp = op.response();
            let kind = match (&op.input, resp) {
                (
                    Input::Get {
                        serializable: true, ..
                    },
                    _,
                )
                | (Input::Get { .. }, None) => continue,
                (
                    Input::Get { .. },
                    Some(Response::Get {
                        header_revision,
                        kv,
                    }),
                ) => KeyOpKind::Get {
                    header: *header_revision,
                    kv: interner.observed(kv),
                },
                (Input::Put { value, lease, .. }, _) => KeyOpKind::Put {
                    value: interner.get(value),
                    lease: *lease,
                    rev: op.write_revision(),
                },
                (Input::Delete { .. }, resp) => KeyOpKind::Delete {
                    result: match resp {
                        Some(Response::Delete {
                            header_revision,
                            deleted,
                        }) => Some((*header_revision, *deleted)),
                        _ => None,
                    },
                },
                (
                    Input::CasPut {
                        expected_mod_revision,
                        value,
                        ..
                    },
                    resp,
                ) => KeyOpKind::Cas {
                    expected: *expected_mod_revision,
                    value: interner.get(value),
                    result: match resp {
                        Some(Response::CasPut {
                            header_revision,
                            succeeded,
                            kv,
                        }) => Some(CasResult {
                            header: *header_revision,
                            succeeded: *succeeded,
                            kv: interner.observed(kv),
                        }),
                        _ => None,
                    },
                },
                // Validation guarantees the response matches the request.
                _ => continue,
            };
            ops.push(KeyOp {
                call: op.call,
                ret: op.effective_return(),
                kind,
                origin,
                fungible: None,
            });
        }
        bound_observed_unknowns(&mut ops, history, indices, &mut interner);
        ops.sort_by_key(|o| (o.call, o.ret));
        KeyHistory {
            ops,
            values: interner.values,
        }
    }

    fn describe_state(&self, s: &KeyState) -> String {
        let mut out = match &s.kv {
            Some(kv) => format!(
                "value {:?}, mod {}, create {}, version {}",
                self.values
                    .get(kv.value as usize)
                    .map_or("?", String::as_str),
                s.last,
                kv.create,
                kv.version
            ),
            None if s.last == Rev::Known(0) => "never written".to_owned(),
            None => format!("absent, deleted at {}", s.last),
        };
        let _ = write!(out, "; its next write must be above revision {}", s.floor);
        out
    }
}

/// An unknown write whose value a completed read returned, when no other write to the key
/// wrote that value, took effect before that read returned: it gets that return time and
/// must be placed. Left open-ended, every such write could go anywhere and the search
/// explodes; this is the patching etcd's robustness tests do for the same reason.
/// Serializable reads count: a member only serves applied writes.
fn bound_observed_unknowns(
    ops: &mut [KeyOp],
    history: &[Operation],
    indices: &[usize],
    interner: &mut Interner,
) {
    let mut writers: HashMap<u32, usize> = HashMap::new();
    for op in ops.iter() {
        if let KeyOpKind::Put { value, .. } | KeyOpKind::Cas { value, .. } = op.kind {
            *writers.entry(value).or_default() += 1;
        }
    }
    let mut seen_by: HashMap<u32, u64> = HashMap::new();
    for &i in indices {
        let op = &history[i];
        if let Some(kv) = op.observed_kv() {
            let value = interner.get(&kv.value);
            let t = seen_by.entry(value).or_insert(u64::MAX);
            *t = (*t).min(op.ret);
        }
    }
    for op in ops.iter_mut().filter(|o| !o.completed()) {
        let value = match op.kind {
            KeyOpKind::Put { value, .. } | KeyOpKind::Cas { value, .. } => value,
            KeyOpKind::Delete { .. } => {
                op.fungible = Some(1);
                continue;
            }
            KeyOpKind::Get { .. } => continue,
        };
        match seen_by.get(&value) {
            Some(&t) if writers.get(&value) == Some(&1) => op.ret = t.max(op.call),
            Some(_) => {}
            // Nothing ever reads its value (or lease), so once placed it must be overwritten
            // before any read: any other such put, also callable by then, would do the same.
            // Trying one of them per point, not each, removes a factorial blow-up.
            None if matches!(op.kind, KeyOpKind::Put { .. }) => op.fungible = Some(0),
            None => {}
        }
    }
}

pub(crate) struct Deepest {
    pub path: Vec<usize>,
    pub state: KeyState,
}

pub(crate) enum Search {
    Linearizable,
    Fail(Deepest),
    Timeout,
}

struct Frame {
    state: KeyState,
    /// Earliest return among the operations not yet linearized: only operations called by
    /// then may go next.
    min_ret: u64,
    next: usize,
    unknown_pass: bool,
    /// Which fungible classes this frame has already tried.
    tried: [bool; 2],
}

fn min_ret(ops: &[KeyOp], bits: &[u64]) -> u64 {
    ops.iter()
        .enumerate()
        .filter(|(i, _)| !is_set(bits, *i))
        .map(|(_, o)| o.ret)
        .min()
        .unwrap_or(u64::MAX)
}

/// The earliest return among the operations not yet placed, or `None` when one of them can no
/// longer be placed at all: revisions only grow, so a write at or below the floor, or a read
/// whose header or mod revision is below the key's last change, is dead. Cutting such branches
/// at once, instead of when that operation finally blocks everything, is what keeps the search
/// from wandering through orders the revisions already rule out.
fn viable(ops: &[KeyOp], bits: &[u64], state: &KeyState) -> Option<u64> {
    let last = state.last_lo();
    let mut min = u64::MAX;
    for (i, op) in ops.iter().enumerate() {
        if is_set(bits, i) || !op.completed() {
            continue;
        }
        min = min.min(op.ret);
        let dead = match &op.kind {
            KeyOpKind::Put { rev: Some(r), .. } => *r <= state.floor,
            KeyOpKind::Delete {
                result: Some((r, 1)),
            } => *r <= state.floor,
            KeyOpKind::Cas {
                result:
                    Some(CasResult {
                        header,
                        succeeded: true,
                        ..
                    }),
                ..
            } => *header <= state.floor,
            KeyOpKind::Get { header, kv }
            | KeyOpKind::Cas {
                result: Some(CasResult { header, kv, .. }),
                ..
            } => *header < last || kv.as_ref().is_some_and(|kv| kv.mod_revision < last),
            KeyOpKind::Delete {
                result: Some((header, _)),
            } => *header < last,
            _ => false,
        };
        if dead {
            return None;
        }
    }
    Some(min)
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn toggle(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

fn id(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// Looks for an order of `ops` that respects real time and the model, in which every completed
/// operation appears. Unknown operations may be left out: that is the case where they never
/// took effect (or took effect after everything observed).
pub(crate) fn search(ops: &[KeyOp], ctx: &Revisions, deadline: Instant) -> Search {
    let must = ops.iter().filter(|o| o.completed()).count();
    if must == 0 {
        return Search::Linearizable;
    }
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    let mut memo: HashSet<(Vec<u64>, KeyState)> = HashSet::new();
    let mut path: Vec<usize> = Vec::new();
    let mut done = 0usize;
    let root = KeyState::initial();
    let mut deepest = Deepest {
        path: Vec::new(),
        state: root.clone(),
    };
    let mut stack = vec![Frame {
        state: root,
        min_ret: min_ret(ops, &bits),
        next: 0,
        unknown_pass: false,
        tried: [false; 2],
    }];
    let mut steps: u64 = 0;
    while let Some(frame) = stack.last_mut() {
        if steps.is_multiple_of(256) && Instant::now() >= deadline {
            return Search::Timeout;
        }
        steps += 1;
        let mut chosen = None;
        loop {
            if frame.next >= ops.len() || ops[frame.next].call > frame.min_ret {
                if frame.unknown_pass {
                    break;
                }
                frame.unknown_pass = true;
                frame.next = 0;
            }
            let j = frame.next;
            frame.next += 1;
            // Operations that must be placed go first: an unknown one can always be left out,
            // so trying without it first reaches a verdict on correct histories sooner.
            if is_set(&bits, j) || ops[j].completed() == frame.unknown_pass {
                continue;
            }
            if let Some(class) = ops[j].fungible {
                if std::mem::replace(&mut frame.tried[class], true) {
                    continue;
                }
            }
            if let Ok(next) = step(&frame.state, &ops[j].kind, id(j), ctx) {
                chosen = Some((j, next));
                break;
            }
        }
        let Some((j, next)) = chosen else {
            stack.pop();
            if let Some(j) = path.pop() {
                toggle(&mut bits, j);
                done -= usize::from(ops[j].completed());
            }
            continue;
        };
        toggle(&mut bits, j);
        path.push(j);
        done += usize::from(ops[j].completed());
        if done == must {
            return Search::Linearizable;
        }
        if !memo.insert((bits.clone(), next.clone())) {
            toggle(&mut bits, j);
            path.pop();
            done -= usize::from(ops[j].completed());
            continue;
        }
        let Some(limit) = viable(ops, &bits, &next) else {
            toggle(&mut bits, j);
            path.pop();
            done -= usize::from(ops[j].completed());
            continue;
        };
        if path.len() > deepest.path.len() {
            deepest = Deepest {
                path: path.clone(),
                state: next.clone(),
            };
        }
        stack.push(Frame {
            min_ret: limit,
            state: next,
            next: 0,
            unknown_pass: false,
            tried: [false; 2],
        });
    }
    Search::Fail(deepest)
}

/// The operations called by `t`, seen from time `t`: those still running then become unknown
/// (reads are dropped). If the whole history is linearizable, so is every such prefix, so the
/// prefixes that fail are exactly those from some `t` on and a binary search finds the first.
fn prefix(ops: &[KeyOp], t: u64) -> Vec<KeyOp> {
    let mut out = Vec::new();
    for op in ops.iter().filter(|o| o.call <= t) {
        let mut op = op.clone();
        if op.ret > t {
            op.ret = u64::MAX;
            match &mut op.kind {
                KeyOpKind::Get { .. } => continue,
                KeyOpKind::Put { rev, .. } => *rev = None,
                KeyOpKind::Delete { result } => *result = None,
                KeyOpKind::Cas { result, .. } => *result = None,
            }
        }
        out.push(op);
    }
    out
}

pub(crate) enum KeyVerdict {
    Linearizable,
    NotLinearizable(String),
    Timeout,
}

/// Checks one key and, when it fails, shrinks the failure while time allows.
pub(crate) fn check_key(
    key: &str,
    history: &[Operation],
    indices: &[usize],
    ctx: &Revisions,
    deadline: Instant,
) -> KeyVerdict {
    let kh = KeyHistory::new(history, indices);
    let mut failing = match search(&kh.ops, ctx, deadline) {
        Search::Linearizable => return KeyVerdict::Linearizable,
        Search::Timeout => return KeyVerdict::Timeout,
        Search::Fail(d) => (kh.ops.clone(), d, None),
    };
    let mut times: Vec<u64> = kh
        .ops
        .iter()
        .filter(|o| o.completed())
        .map(|o| o.ret)
        .collect();
    times.sort_unstable();
    times.dedup();
    // Invariant: the prefix at times[hi] fails (or hi == len: the whole history fails).
    let (mut lo, mut hi) = (0, times.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let ops = prefix(&kh.ops, times[mid]);
        match search(&ops, ctx, deadline) {
            Search::Linearizable => lo = mid + 1,
            Search::Fail(d) => {
                failing = (ops, d, Some(times[mid]));
                hi = mid;
            }
            Search::Timeout => break,
        }
    }
    KeyVerdict::NotLinearizable(explain(key, &kh, history, ctx, failing))
}

const MAX_LISTED: usize = 40;

fn explain(
    key: &str,
    kh: &KeyHistory,
    history: &[Operation],
    ctx: &Revisions,
    (ops, deepest, cut): (Vec<KeyOp>, Deepest, Option<u64>),
) -> String {
    let mut out = format!(
        "key {key:?}: no order of its operations respects real time and etcd's semantics.\n"
    );
    match cut {
        Some(t) => {
            let _ = writeln!(
                out,
                "Shortest failing prefix: the {} operations called by t={t} (of {} on the key); \
                 those still running at t count as unknown:",
                ops.len(),
                kh.ops.len()
            );
        }
        None => {
            let _ = writeln!(out, "The {} operations on the key:", ops.len());
        }
    }
    for op in ops.iter().take(MAX_LISTED) {
        let pending = if op.completed() || history[op.origin].is_unknown() {
            ""
        } else {
            " (running at the cut: unknown)"
        };
        let _ = writeln!(out, "  #{} {}{pending}", op.origin, history[op.origin]);
    }
    if ops.len() > MAX_LISTED {
        let _ = writeln!(out, "  ... and {} more", ops.len() - MAX_LISTED);
    }
    let order: Vec<String> = deepest
        .path
        .iter()
        .map(|&i| format!("#{}", ops[i].origin))
        .collect();
    let _ = writeln!(
        out,
        "Longest valid order found ({} operations): [{}]",
        order.len(),
        order.join(", ")
    );
    let _ = writeln!(out, "Key after it: {}", kh.describe_state(&deepest.state));
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    for &i in &deepest.path {
        toggle(&mut bits, i);
    }
    let limit = min_ret(&ops, &bits);
    let _ = writeln!(out, "None of the operations that may go next fits:");
    for (j, op) in ops.iter().enumerate() {
        if is_set(&bits, j) || op.call > limit {
            continue;
        }
        let why = match step(&deepest.state, &op.kind, id(j), ctx) {
            Err(reject) => reject.to_string(),
            Ok(_) => "it fits, but no order continuing from it works".to_owned(),
        };
        let _ = writeln!(out, "  #{}: {why}", op.origin);
    }
    out
}
