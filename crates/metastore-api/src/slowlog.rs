//! etcd's slow request warning: a KV request that took longer than
//! `--experimental-warning-apply-duration` (100 ms) is logged as etcd logs it, "apply request
//! took too long", with what was asked (keys and sizes, never values) and the answer's size,
//! and counted in `etcd_server_slow_apply_total`. Here `took` is the whole request on this
//! member (a write's replication and fsync included), which is what a slow client sees.

use bytes::Bytes;
use prost::Message;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// What a slow request's log line says it asked, kept cheap until the request is known slow.
pub(crate) enum Asked {
    Range {
        key: Bytes,
        range_end: Bytes,
        limit: i64,
        revision: i64,
        serializable: bool,
    },
    Put {
        key: Bytes,
        value_size: usize,
        lease: i64,
    },
    DeleteRange {
        key: Bytes,
        range_end: Bytes,
    },
    Txn {
        compares: usize,
        success: usize,
        failure: usize,
        first_key: Option<Bytes>,
    },
}

/// Go's `%q` of a key, as etcd's request strings print it.
fn quoted(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

impl std::fmt::Display for Asked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Asked::Range {
                key,
                range_end,
                limit,
                revision,
                serializable,
            } => {
                write!(f, "key:{} ", quoted(key))?;
                if !range_end.is_empty() {
                    write!(f, "range_end:{} ", quoted(range_end))?;
                }
                if *limit != 0 {
                    write!(f, "limit:{limit} ")?;
                }
                if *revision != 0 {
                    write!(f, "revision:{revision} ")?;
                }
                if *serializable {
                    write!(f, "serializable:true ")?;
                }
                Ok(())
            }
            Asked::Put {
                key,
                value_size,
                lease,
            } => {
                write!(f, "put:<key:{} value_size:{value_size} ", quoted(key))?;
                if *lease != 0 {
                    write!(f, "lease:{lease} ")?;
                }
                write!(f, ">")
            }
            Asked::DeleteRange { key, range_end } => {
                write!(f, "delete_range:<key:{} ", quoted(key))?;
                if !range_end.is_empty() {
                    write!(f, "range_end:{} ", quoted(range_end))?;
                }
                write!(f, ">")
            }
            Asked::Txn {
                compares,
                success,
                failure,
                first_key,
            } => {
                write!(
                    f,
                    "txn:<compare_count:{compares} success_count:{success} failure_count:{failure} "
                )?;
                if let Some(key) = first_key {
                    write!(f, "first_key:{} ", quoted(key))?;
                }
                write!(f, ">")
            }
        }
    }
}

/// A request's clock.
pub(crate) struct SlowLog {
    started: Instant,
    threshold: Duration,
}

impl SlowLog {
    pub(crate) fn start(threshold: Duration) -> Self {
        Self {
            started: Instant::now(),
            threshold,
        }
    }

    /// Logs the request if it was slow. `prefix` is etcd's (`read-only range `, `read-only
    /// txn ` or empty for a write); `count` is the number of keys a read returned.
    pub(crate) fn finish<M: Message>(
        self,
        prefix: &str,
        asked: impl FnOnce() -> Asked,
        answer: Result<&M, &tonic::Status>,
        count: Option<usize>,
    ) {
        let took = self.started.elapsed();
        if took <= self.threshold {
            return;
        }
        let mut response = String::new();
        let mut error = String::new();
        match answer {
            Ok(message) => {
                if let Some(count) = count {
                    let _ = write!(response, "range_response_count:{count} ");
                }
                let _ = write!(response, "size:{}", message.encoded_len());
            }
            Err(status) => error = status.message().to_string(),
        }
        metrics::counter!("etcd_server_slow_apply_total").increment(1);
        tracing::warn!(
            took = ?took,
            expected_duration = ?self.threshold,
            prefix,
            request = %asked(),
            response = %response,
            error = %error,
            "apply request took too long"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_print_keys_and_sizes_never_values() {
        let put = Asked::Put {
            key: Bytes::from_static(b"k\x00"),
            value_size: 5,
            lease: 7,
        };
        assert_eq!(
            put.to_string(),
            r#"put:<key:"k\x00" value_size:5 lease:7 >"#
        );
        let range = Asked::Range {
            key: Bytes::from_static(b"a"),
            range_end: Bytes::from_static(b"b"),
            limit: 10,
            revision: 0,
            serializable: true,
        };
        assert_eq!(
            range.to_string(),
            r#"key:"a" range_end:"b" limit:10 serializable:true "#
        );
    }
}
