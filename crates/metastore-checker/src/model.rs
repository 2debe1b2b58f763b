//! etcd's KV semantics for one key, as the per-key search steps through it.
//!
//! The global revision does not fit a per-key model, so the model carries what one key can
//! know about it: the revision of its last change, and a floor every later write to it must
//! exceed (its own writes and the header revisions of reads that saw it). Writes whose outcome
//! is unknown get a *floating* revision, an interval pinned to a value when some read reports
//! it; that keeps the state space finite without guessing revisions.

use crate::history::{KeyValue, Revision};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Rev {
    Known(Revision),
    /// The revision of the unknown write `id` (its index among the key's operations), some
    /// value in `lo..=hi`.
    Floating {
        id: u32,
        lo: Revision,
        hi: Revision,
    },
}

impl Rev {
    fn lo(self) -> Revision {
        match self {
            Rev::Known(r) => r,
            Rev::Floating { lo, .. } => lo,
        }
    }

    /// Records that this revision is at most `bound`.
    fn at_most(&mut self, bound: Revision, ctx: &Revisions) -> Result<(), Reject> {
        match self {
            Rev::Known(r) if *r <= bound => Ok(()),
            Rev::Known(_) => Err(Reject::RevisionOrder),
            Rev::Floating { lo, hi, .. } => {
                *hi = (*hi).min(bound);
                if ctx.free_within(*lo, *hi) {
                    Ok(())
                } else {
                    Err(Reject::RevisionOrder)
                }
            }
        }
    }
}

impl std::fmt::Display for Rev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rev::Known(r) => write!(f, "{r}"),
            Rev::Floating {
                lo,
                hi: Revision::MAX,
                ..
            } => write!(f, "unknown (>= {lo})"),
            Rev::Floating { lo, hi, .. } => write!(f, "unknown (in {lo}..={hi})"),
        }
    }
}

/// The revisions acknowledged writes hold, over all keys. An unknown write that took effect
/// holds a revision none of them does, so a floating revision needs a free one in its
/// interval. Unrecorded writes only make fewer revisions free than this assumes, so the
/// check stays sound on incomplete histories; it is what stops the search from trying every
/// unknown write at every point between two acknowledged revisions.
#[derive(Debug, Default)]
pub(crate) struct Revisions {
    acked: Vec<Revision>,
}

impl Revisions {
    pub fn new(mut acked: Vec<Revision>) -> Self {
        acked.sort_unstable();
        acked.dedup();
        Revisions { acked }
    }

    /// Whether some revision in `lo..=hi` is held by no acknowledged write.
    fn free_within(&self, lo: Revision, hi: Revision) -> bool {
        if lo > hi {
            return false;
        }
        let held =
            self.acked.partition_point(|&r| r <= hi) - self.acked.partition_point(|&r| r < lo);
        i128::from(hi) - i128::from(lo) + 1 > held as i128
    }
}

/// A present key. Its mod revision is [`KeyState::last`]. Values are interned per key so the
/// state stays small and cheap to hash for memoisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Kv {
    pub value: u32,
    pub lease: i64,
    pub version: i64,
    pub create: Rev,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyState {
    pub kv: Option<Kv>,
    /// Revision of the key's last change (put or delete); 0 before any.
    pub last: Rev,
    /// Every later write to this key must have a revision above this.
    pub floor: Revision,
}

impl KeyState {
    pub fn initial() -> Self {
        KeyState {
            kv: None,
            last: Rev::Known(0),
            floor: 0,
        }
    }

    /// A lower bound on the key's last change, which never decreases as operations apply.
    pub fn last_lo(&self) -> Revision {
        self.last.lo()
    }

    fn pin(&mut self, slot: Rev, value: Revision, ctx: &Revisions) -> Result<(), Reject> {
        match slot {
            Rev::Known(r) if r == value => Ok(()),
            Rev::Known(_) => Err(Reject::RevisionMismatch),
            Rev::Floating { id, lo, hi } => {
                if !(lo..=hi).contains(&value) || !ctx.free_within(value, value) {
                    return Err(Reject::RevisionMismatch);
                }
                let fix = |r: &mut Rev| {
                    if matches!(r, Rev::Floating { id: i, .. } if *i == id) {
                        *r = Rev::Known(value);
                    }
                };
                fix(&mut self.last);
                if let Some(kv) = &mut self.kv {
                    fix(&mut kv.create);
                }
                Ok(())
            }
        }
    }

    /// A read with header revision `header` returned `observed`.
    fn observe(
        &mut self,
        observed: Option<&ObservedKv>,
        header: Revision,
        ctx: &Revisions,
    ) -> Result<(), Reject> {
        match (&self.kv, observed) {
            (None, None) => {}
            (Some(_), None) => return Err(Reject::MissingKey),
            (None, Some(_)) => return Err(Reject::UnexpectedKey),
            (Some(kv), Some(o)) => {
                if kv.value != o.value {
                    return Err(Reject::Value);
                }
                if kv.version != o.version || kv.lease != o.lease {
                    return Err(Reject::VersionOrLease);
                }
                self.pin(self.last, o.mod_revision, ctx)?;
                // Re-read: pinning the mod revision may have pinned the create revision too.
                if let Some(kv) = &self.kv {
                    let create = kv.create;
                    self.pin(create, o.create_revision, ctx)?;
                }
            }
        }
        // The read saw the store at `header`: this key's last change is no later, and its next
        // change will be later.
        self.last
            .at_most(header, ctx)
            .map_err(|_| Reject::HeaderTooOld)?;
        self.floor = self.floor.max(header);
        Ok(())
    }

    fn write(&mut self, rev: Rev, ctx: &Revisions) -> Result<(), Reject> {
        if let Rev::Known(r) = rev {
            if r <= self.floor {
                return Err(Reject::RevisionOrder);
            }
            self.last.at_most(r - 1, ctx)?;
            if let Some(kv) = &mut self.kv {
                kv.create.at_most(r - 1, ctx)?;
            }
            self.floor = r;
        }
        self.last = rev;
        Ok(())
    }

    fn put(&mut self, value: u32, lease: i64, rev: Rev, ctx: &Revisions) -> Result<(), Reject> {
        self.write(rev, ctx)?;
        let (create, version) = match &self.kv {
            Some(kv) => (kv.create, kv.version + 1),
            None => (rev, 1),
        };
        self.kv = Some(Kv {
            value,
            lease,
            version,
            create,
        });
        Ok(())
    }

    fn floating(&self, id: u32) -> Rev {
        Rev::Floating {
            id,
            lo: self.floor.max(self.last.lo()) + 1,
            hi: Revision::MAX,
        }
    }

    /// Makes the current mod revision equal `expected` if it can be (a CAS that succeeded).
    fn require_mod(&mut self, expected: Revision, ctx: &Revisions) -> Result<(), Reject> {
        match self.kv {
            None if expected == 0 => Ok(()),
            None => Err(Reject::CasBranch),
            Some(_) => self
                .pin(self.last, expected, ctx)
                .map_err(|_| Reject::CasBranch),
        }
    }
}

/// A key-value pair some read reported, with its value interned.
#[derive(Clone, Debug)]
pub(crate) struct ObservedKv {
    pub value: u32,
    pub mod_revision: Revision,
    pub create_revision: Revision,
    pub version: i64,
    pub lease: i64,
}

impl ObservedKv {
    pub fn new(kv: &KeyValue, value: u32) -> Self {
        ObservedKv {
            value,
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// One operation on the key, with `None` results for unknown outcomes. Unknown reads constrain
/// nothing and are dropped before the search.
#[derive(Clone, Debug)]
pub(crate) enum KeyOpKind {
    Put {
        value: u32,
        lease: i64,
        rev: Option<Revision>,
    },
    Get {
        header: Revision,
        kv: Option<ObservedKv>,
    },
    Delete {
        result: Option<(Revision, i64)>,
    },
    Cas {
        expected: Revision,
        value: u32,
        result: Option<CasResult>,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct CasResult {
    pub header: Revision,
    pub succeeded: bool,
    pub kv: Option<ObservedKv>,
}

/// Why an operation cannot be linearized at some point; shown in failure explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    Value,
    VersionOrLease,
    MissingKey,
    UnexpectedKey,
    RevisionMismatch,
    RevisionOrder,
    HeaderTooOld,
    CasBranch,
    NoEffect,
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reject::Value => "it reports a different value than the key holds here",
            Reject::VersionOrLease => {
                "it reports a different version or lease than the key has here"
            }
            Reject::MissingKey => "it reports the key absent but the key exists here",
            Reject::UnexpectedKey => "it reports the key present but the key is absent here",
            Reject::RevisionMismatch => "it reports a mod/create revision the key cannot have here",
            Reject::RevisionOrder => {
                "its revision is not above the key's last change or an earlier read's header"
            }
            Reject::HeaderTooOld => "its header revision is older than the key's last change",
            Reject::CasBranch => "the CAS comparison would have gone the other way here",
            Reject::NoEffect => "with an unknown outcome it could only have had no effect here",
        })
    }
}

/// Applies `op` (whose floating revision, if any, is identified by `id`) to `state`.
pub(crate) fn step(
    state: &KeyState,
    op: &KeyOpKind,
    id: u32,
    ctx: &Revisions,
) -> Result<KeyState, Reject> {
    let mut s = state.clone();
    match op {
        KeyOpKind::Put { value, lease, rev } => {
            let rev = rev.map_or_else(|| s.floating(id), Rev::Known);
            s.put(*value, *lease, rev, ctx)?;
        }
        KeyOpKind::Get { header, kv } => s.observe(kv.as_ref(), *header, ctx)?,
        KeyOpKind::Delete { result } => match result {
            Some((rev, 1)) => {
                if s.kv.is_none() {
                    return Err(Reject::UnexpectedKey);
                }
                s.write(Rev::Known(*rev), ctx)?;
                s.kv = None;
            }
            Some((header, _)) => s.observe(None, *header, ctx)?,
            // An unknown delete of an absent key is the same as no delete: the search never
            // has to place it, so it is not offered.
            None if s.kv.is_none() => return Err(Reject::NoEffect),
            None => {
                s.write(s.floating(id), ctx)?;
                s.kv = None;
            }
        },
        KeyOpKind::Cas {
            expected,
            value,
            result,
        } => match result {
            Some(CasResult {
                header,
                succeeded: true,
                ..
            }) => {
                s.require_mod(*expected, ctx)?;
                s.put(*value, 0, Rev::Known(*header), ctx)?;
            }
            Some(CasResult { header, kv, .. }) => {
                s.observe(kv.as_ref(), *header, ctx)?;
                let current = if s.kv.is_some() {
                    s.last
                } else {
                    Rev::Known(0)
                };
                if current == Rev::Known(*expected) {
                    return Err(Reject::CasBranch);
                }
            }
            // As with deletes, only the branch that changes something needs exploring.
            None => {
                s.require_mod(*expected, ctx)?;
                s.put(*value, 0, s.floating(id), ctx)?;
            }
        },
    }
    Ok(s)
}
