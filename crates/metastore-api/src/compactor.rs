//! Auto-compaction, as etcd's `v3compactor`: `--auto-compaction-mode periodic|revision` with
//! `--auto-compaction-retention`. The leader proposes an ordinary `Compaction` through raft,
//! so every member compacts at the same revision; followers only watch the clock.
//!
//! - periodic: keep the history of the last `retention` (a Go duration such as `1h`, `30m`,
//!   or a bare number of hours). A revision is sampled every tenth of the period (at most
//!   every 6 minutes); once a period has passed, the store is compacted to the revision sampled
//!   one period ago, then again every period (at most every hour).
//! - revision: every 5 minutes (`auto-compaction-revision-interval-ms` for tests), compact
//!   to `current revision - retention`.

use crate::EtcdServer;
use metastore_engine::Engine;
use metastore_proto::etcdserverpb::CompactionRequest;
use metastore_proto::internal::command::Op;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// etcd's `--auto-compaction-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompactionMode {
    #[default]
    Periodic,
    Revision,
}

/// What to keep, parsed from `--auto-compaction-retention` for the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// No auto-compaction (etcd's "0").
    Off,
    Period(Duration),
    Revisions(i64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("error parsing CompactionRetention: time: invalid duration {0:?}")]
pub struct RetentionError(pub String);

/// etcd's `parseCompactionRetention`: a bare non-negative integer is hours (periodic) or
/// revisions (revision); anything else must be a Go duration (and means a period).
pub fn parse_retention(mode: CompactionMode, text: &str) -> Result<Retention, RetentionError> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i64>() {
        if n >= 0 {
            return Ok(match (n, mode) {
                (0, _) => Retention::Off,
                (n, CompactionMode::Revision) => Retention::Revisions(n),
                (n, CompactionMode::Periodic) => {
                    Retention::Period(Duration::from_secs(n as u64 * 3600))
                }
            });
        }
    }
    let period = parse_go_duration(text).ok_or_else(|| RetentionError(text.to_string()))?;
    Ok(if period.is_zero() {
        Retention::Off
    } else {
        Retention::Period(period)
    })
}

/// Go's `time.ParseDuration` for non-negative durations: `300ms`, `1.5h`, `2h45m`, `0`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// How often the revision mode checks (etcd: 5 minutes).
pub const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// Starts the compactor for `retention` (nothing for `Off`). It holds the server weakly and
/// stops with it.
pub fn spawn<E: Engine>(
    server: &Arc<EtcdServer<E>>,
    retention: Retention,
    revision_check_interval: Duration,
) {
    let server = Arc::downgrade(server);
    match retention {
        Retention::Off => {}
        Retention::Period(period) => {
            tokio::spawn(run_periodic(server, period));
        }
        Retention::Revisions(keep) => {
            tokio::spawn(run_revision(server, keep, revision_check_interval));
        }
    }
}

async fn run_periodic<E: Engine>(server: Weak<EtcdServer<E>>, period: Duration) {
    let compact_interval = period.min(Duration::from_secs(3600));
    let retry_interval = compact_interval / 10;
    let retentions = (period.as_nanos() / retry_interval.as_nanos().max(1)) as usize + 1;
    let mut revisions: VecDeque<i64> = VecDeque::with_capacity(retentions + 1);
    let mut last_revision = 0;
    let mut last_success = Instant::now();
    // The first compaction waits a whole period (history younger than that is kept); later
    // ones come every compaction interval.
    let mut wait = period;
    loop {
        {
            let Some(server) = server.upgrade() else {
                return;
            };
            revisions.push_back(server.store.current_revision());
            if revisions.len() > retentions {
                revisions.pop_front();
            }
        }
        tokio::time::sleep(retry_interval).await;
        let Some(server) = server.upgrade() else {
            return;
        };
        if !server.raft.status().is_leader {
            continue;
        }
        let Some(&revision) = revisions.front() else {
            continue;
        };
        if last_success.elapsed() < wait || revision == last_revision {
            continue;
        }
        wait = compact_interval;
        tracing::info!(revision, compact_period = ?period, "starting auto periodic compaction");
        if compact(&server, revision).await {
            last_revision = revision;
            last_success = Instant::now();
        }
    }
}

async fn run_revision<E: Engine>(server: Weak<EtcdServer<E>>, keep: i64, interval: Duration) {
    let mut previous = 0;
    loop {
        tokio::time::sleep(interval).await;
        let Some(server) = server.upgrade() else {
            return;
        };
        if !server.raft.status().is_leader {
            continue;
        }
        let revision = server.store.current_revision() - keep;
        if revision <= 0 || revision == previous {
            continue;
        }
        tracing::info!(
            revision,
            revision_compaction_retention = keep,
            "starting auto revision compaction"
        );
        if compact(&server, revision).await {
            previous = revision;
        }
    }
}

/// Proposes the compaction; true when it applied or the store was already compacted there.
async fn compact<E: Engine>(server: &Arc<EtcdServer<E>>, revision: i64) -> bool {
    if revision <= server.store.compact_revision() {
        // Compacted there already (by a client, or a compaction racing this one): etcd counts
        // ErrCompacted as done.
        return true;
    }
    let started = Instant::now();
    let request = CompactionRequest {
        revision,
        physical: false,
    };
    match server.submit(Op::Compaction(request)).await {
        Ok(_) => {
            tracing::info!(
                revision,
                took_ms = started.elapsed().as_millis() as u64,
                "completed auto compaction"
            );
            true
        }
        Err(status) => {
            tracing::warn!(revision, error = %status.message(), "failed auto compaction");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parses_as_etcd() {
        use CompactionMode::*;
        let hours = |h: u64| Retention::Period(Duration::from_secs(h * 3600));
        assert_eq!(parse_retention(Periodic, "0"), Ok(Retention::Off));
        assert_eq!(parse_retention(Revision, "0"), Ok(Retention::Off));
        assert_eq!(parse_retention(Periodic, "1"), Ok(hours(1)));
        assert_eq!(
            parse_retention(Revision, "1000"),
            Ok(Retention::Revisions(1000))
        );
        assert_eq!(
            parse_retention(Periodic, "30m"),
            Ok(Retention::Period(Duration::from_secs(1800)))
        );
        // A duration means a period whatever the mode, as in etcd.
        assert_eq!(
            parse_retention(Revision, "1h30m"),
            Ok(Retention::Period(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse_retention(Periodic, "1.5h"),
            Ok(Retention::Period(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse_retention(Periodic, "500ms"),
            Ok(Retention::Period(Duration::from_millis(500)))
        );
        for bad in ["", "h", "1x", "-1", "1h-5m", "ten"] {
            assert!(parse_retention(Periodic, bad).is_err(), "{bad:?}");
        }
    }
}
