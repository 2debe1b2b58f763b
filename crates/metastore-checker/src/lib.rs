//! A linearizability checker for histories recorded by etcd v3 clients, in the spirit of
//! etcd's `tests/robustness` and porcupine: a Wing–Gong search per key, tied together by
//! checks on the global revision. See the crate README for the decomposition and its limits.
//!
//! ```
//! use std::time::Duration;
//! use metastore_checker::{check, CheckResult, Input, Operation, Outcome, Response};
//!
//! let history = vec![Operation {
//!     client: 1,
//!     call: 0,
//!     ret: 10,
//!     input: Input::Put { key: "k".into(), value: "v".into(), lease: 0 },
//!     outcome: Outcome::Ok(Response::Put { header_revision: 2 }),
//! }];
//! assert_eq!(check(&history, Duration::from_secs(1)).unwrap(), CheckResult::Linearizable);
//! ```

mod global;
mod history;
mod model;
mod search;
mod watch;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use history::{
    read_jsonl, validate, write_jsonl, ClientId, Input, KeyValue, Operation, Outcome, Response,
    Revision,
};
pub use watch::{
    check_resumed_watch, check_watch, EventType, WatchEvent, WatchRequest, WatchViolation,
};

/// The verdict on a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    NotLinearizable {
        /// The key whose operations fail, or `None` when the failure is in the revisions that
        /// cross keys.
        key: Option<String>,
        explanation: String,
    },
    /// The time limit ran out before a verdict: nothing is claimed either way.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("operation #{index} cannot be checked: {reason}")]
    Invalid { index: usize, reason: String },
    #[error("line {line}: {source}")]
    Json {
        line: usize,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Checks `history` against etcd's semantics, stopping with [`CheckResult::Unknown`] once
/// `time_limit` has passed without a verdict.
///
/// The history must start from an empty store and hold every write to the keys it touches;
/// the checks assume nothing else changed them (leases are not expired, for one).
pub fn check(history: &[Operation], time_limit: Duration) -> Result<CheckResult, HistoryError> {
    let start = Instant::now();
    let deadline = start
        .checked_add(time_limit)
        .unwrap_or(start + Duration::from_secs(1 << 40));
    validate(history)?;
    // The cross-key checks are linear-ish and deterministic, so they run whatever the limit:
    // a violation they find is a verdict, not a guess.
    let global = global::Writes::new(history).and_then(|w| {
        global::check_real_time(history)?;
        global::check_observed(&w)?;
        global::check_serializable(&w)?;
        Ok(model::Revisions::new(w.by_rev.keys().copied().collect()))
    });
    let revisions = match global {
        Ok(r) => r,
        Err(v) => {
            return Ok(CheckResult::NotLinearizable {
                key: v.key,
                explanation: v.explanation,
            })
        }
    };
    let mut keys: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        if let Some(key) = op.key() {
            keys.entry(key).or_default().push(i);
        }
    }
    let mut timed_out = false;
    for (key, indices) in &keys {
        match search::check_key(key, history, indices, &revisions, deadline) {
            search::KeyVerdict::Linearizable => {}
            search::KeyVerdict::NotLinearizable(explanation) => {
                return Ok(CheckResult::NotLinearizable {
                    key: Some((*key).to_owned()),
                    explanation,
                })
            }
            // Keep going: another key may still give a definite failure quickly.
            search::KeyVerdict::Timeout => timed_out = true,
        }
    }
    Ok(if timed_out {
        CheckResult::Unknown
    } else {
        CheckResult::Linearizable
    })
}
