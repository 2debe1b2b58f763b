//! The recorded history: what a client asked, when, and what it was told.
//!
//! Everything here is plain data with serde derives so a test harness can dump a history as
//! JSON lines while it runs and the checker (or a person) can re-read it after a failure.

use std::fmt;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::HistoryError;

/// Identifies the client (one sequential actor) that issued an operation.
pub type ClientId = u64;
/// An etcd store revision.
pub type Revision = i64;

/// One request of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub client: ClientId,
    /// Nanoseconds since a start shared by every client of the history.
    pub call: u64,
    /// Nanoseconds since the same start. Ignored when the outcome is [`Outcome::Unknown`]: such a
    /// request may take effect at any time after its call, so its return is treated as infinite.
    #[serde(rename = "return")]
    pub ret: u64,
    pub input: Input,
    pub outcome: Outcome,
}

/// What the client asked for. Keys and values are strings because test workloads use them;
/// binary keys can be recorded hex-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Input {
    Put {
        key: String,
        value: String,
        #[serde(default)]
        lease: i64,
    },
    Get {
        key: String,
        /// A serializable (possibly stale) read, checked for consistency only.
        #[serde(default)]
        serializable: bool,
    },
    Delete {
        key: String,
    },
    /// An etcd Txn: `if mod_revision(key) == expected { put(key, value) } else { get(key) }`.
    /// A missing key has mod revision 0, so `expected_mod_revision: 0` means "create".
    CasPut {
        key: String,
        expected_mod_revision: Revision,
        value: String,
    },
    LeaseGrant {
        id: i64,
    },
}

/// A key's state as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyValue {
    pub value: String,
    pub mod_revision: Revision,
    pub create_revision: Revision,
    pub version: i64,
    #[serde(default)]
    pub lease: i64,
}

/// etcd's response, reduced to the fields the checker reasons about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Get {
        header_revision: Revision,
        kv: Option<KeyValue>,
    },
    /// etcd's put header revision is the revision the put created.
    Put {
        header_revision: Revision,
    },
    /// With `deleted == 1` the header revision is the delete's revision; with 0 nothing changed
    /// and it is merely the store's revision at the time.
    Delete {
        header_revision: Revision,
        deleted: i64,
    },
    /// On success the header revision is the put's revision; on failure `kv` is what the else
    /// branch's get read.
    CasPut {
        header_revision: Revision,
        succeeded: bool,
        kv: Option<KeyValue>,
    },
    LeaseGrant {
        header_revision: Revision,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Response),
    /// The request failed or timed out: it may have taken effect at any time after its call,
    /// or never.
    Unknown,
}

/// What a write did to its key, when it did anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect<'a> {
    Put(&'a str),
    Delete,
}

impl Operation {
    pub fn key(&self) -> Option<&str> {
        match &self.input {
            Input::Put { key, .. }
            | Input::Get { key, .. }
            | Input::Delete { key }
            | Input::CasPut { key, .. } => Some(key),
            Input::LeaseGrant { .. } => None,
        }
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown)
    }

    /// The return time the real-time order uses: infinite for unknown outcomes.
    pub fn effective_return(&self) -> u64 {
        if self.is_unknown() {
            u64::MAX
        } else {
            self.ret
        }
    }

    pub fn response(&self) -> Option<&Response> {
        match &self.outcome {
            Outcome::Ok(r) => Some(r),
            Outcome::Unknown => None,
        }
    }

    pub fn is_serializable_read(&self) -> bool {
        matches!(
            self.input,
            Input::Get {
                serializable: true,
                ..
            }
        )
    }

    /// The revision an acknowledged write created, or `None` if it changed nothing (or its
    /// outcome is unknown).
    pub fn write_revision(&self) -> Option<Revision> {
        match self.response()? {
            Response::Put { header_revision } => Some(*header_revision),
            Response::Delete {
                header_revision,
                deleted,
            } if *deleted > 0 => Some(*header_revision),
            Response::CasPut {
                header_revision,
                succeeded: true,
                ..
            } => Some(*header_revision),
            _ => None,
        }
    }

    pub fn header_revision(&self) -> Option<Revision> {
        Some(match self.response()? {
            Response::Get {
                header_revision, ..
            }
            | Response::Put { header_revision }
            | Response::Delete {
                header_revision, ..
            }
            | Response::CasPut {
                header_revision, ..
            }
            | Response::LeaseGrant { header_revision } => *header_revision,
        })
    }

    /// The change this operation makes to its key if it takes effect (for an unknown CAS,
    /// if its comparison succeeds). A delete's effect does not depend on its deleted count.
    pub(crate) fn effect(&self) -> Option<Effect<'_>> {
        match &self.input {
            Input::Put { value, .. } | Input::CasPut { value, .. } => Some(Effect::Put(value)),
            Input::Delete { .. } => Some(Effect::Delete),
            _ => None,
        }
    }

    /// Every key-value pair the response reports as read.
    pub(crate) fn observed_kv(&self) -> Option<&KeyValue> {
        match self.response()? {
            Response::Get { kv, .. } | Response::CasPut { kv, .. } => kv.as_ref(),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let Some(resp) = self.response() else {
            return Ok(());
        };
        if self.ret < self.call {
            return Err(format!(
                "returns ({}) before its call ({})",
                self.ret, self.call
            ));
        }
        let kinds_match = matches!(
            (&self.input, resp),
            (Input::Put { .. }, Response::Put { .. })
                | (Input::Get { .. }, Response::Get { .. })
                | (Input::Delete { .. }, Response::Delete { .. })
                | (Input::CasPut { .. }, Response::CasPut { .. })
                | (Input::LeaseGrant { .. }, Response::LeaseGrant { .. })
        );
        if !kinds_match {
            return Err("response kind does not match the request".into());
        }
        if let Response::Delete { deleted, .. } = resp {
            if !(0..=1).contains(deleted) {
                return Err(format!("a single-key delete reports {deleted} deleted"));
            }
        }
        if self.write_revision().is_some_and(|r| r <= 0) {
            return Err("a write reports a revision <= 0".into());
        }
        Ok(())
    }
}

/// Rejects histories the checker cannot interpret, so that a malformed recording is never
/// mistaken for a consistency violation (or for a pass).
pub fn validate(history: &[Operation]) -> Result<(), HistoryError> {
    for (index, op) in history.iter().enumerate() {
        op.validate()
            .map_err(|reason| HistoryError::Invalid { index, reason })?;
    }
    Ok(())
}

/// Writes one operation per line.
pub fn write_jsonl<W: Write>(history: &[Operation], mut out: W) -> Result<(), HistoryError> {
    for op in history {
        serde_json::to_writer(&mut out, op)
            .map_err(|source| HistoryError::Json { line: 0, source })?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads what [`write_jsonl`] wrote; blank lines are skipped.
pub fn read_jsonl<R: BufRead>(input: R) -> Result<Vec<Operation>, HistoryError> {
    let mut ops = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op = serde_json::from_str(&line).map_err(|source| HistoryError::Json {
            line: i + 1,
            source,
        })?;
        ops.push(op);
    }
    Ok(ops)
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{value {:?}, mod {}, create {}, version {}",
            self.value, self.mod_revision, self.create_revision, self.version
        )?;
        if self.lease != 0 {
            write!(f, ", lease {}", self.lease)?;
        }
        f.write_str("}")
    }
}

struct OptKv<'a>(&'a Option<KeyValue>);

impl fmt::Display for OptKv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(kv) => kv.fmt(f),
            None => f.write_str("<none>"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} [{}, ", self.client, self.call)?;
        if self.is_unknown() {
            f.write_str("inf) ")?;
        } else {
            write!(f, "{}] ", self.ret)?;
        }
        match &self.input {
            Input::Put { key, value, lease } if *lease != 0 => {
                write!(f, "put {key:?}={value:?} lease {lease}")?
            }
            Input::Put { key, value, .. } => write!(f, "put {key:?}={value:?}")?,
            Input::Get { key, serializable } => {
                let kind = if *serializable { " (serializable)" } else { "" };
                write!(f, "get {key:?}{kind}")?
            }
            Input::Delete { key } => write!(f, "delete {key:?}")?,
            Input::CasPut {
                key,
                expected_mod_revision,
                value,
            } => write!(
                f,
                "cas {key:?} if mod=={expected_mod_revision} put {value:?}"
            )?,
            Input::LeaseGrant { id } => write!(f, "lease grant {id}")?,
        }
        f.write_str(" -> ")?;
        match self.response() {
            None => f.write_str("unknown"),
            Some(Response::Get {
                header_revision,
                kv,
            }) => write!(f, "{} @{header_revision}", OptKv(kv)),
            Some(Response::Put { header_revision }) => write!(f, "rev {header_revision}"),
            Some(Response::Delete {
                header_revision,
                deleted,
            }) => write!(f, "deleted {deleted} @{header_revision}"),
            Some(Response::CasPut {
                header_revision,
                succeeded: true,
                ..
            }) => write!(f, "succeeded, rev {header_revision}"),
            Some(Response::CasPut {
                header_revision,
                succeeded: false,
                kv,
            }) => write!(f, "failed, read {} @{header_revision}", OptKv(kv)),
            Some(Response::LeaseGrant { header_revision }) => write!(f, "@{header_revision}"),
        }
    }
}
