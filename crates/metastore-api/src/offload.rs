//! Reads that may scan many keys run on tokio's blocking pool, not on a runtime worker: a
//! range over a million keys holds its thread for about a second, and the runtime has one
//! worker per core (two on a small machine), so every other client whose requests sit on
//! that worker would wait behind it. Single keys and small pages stay on the worker, where
//! a hop to another thread would cost more than the read.

use metastore_proto::etcdserverpb::{request_op, RangeRequest, TxnRequest};

/// Pages up to this many keys are read in place.
const INLINE_LIMIT: i64 = 1_000;

/// A range over more than one key without a small limit.
pub(crate) fn range_may_be_large(req: &RangeRequest) -> bool {
    !req.range_end.is_empty() && (req.limit <= 0 || req.limit > INLINE_LIMIT)
}

/// A Txn with such a range in either branch, at any depth.
pub(crate) fn txn_may_be_large(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(req.failure.iter())
        .any(|op| match &op.request {
            Some(request_op::Request::RequestRange(r)) => range_may_be_large(r),
            Some(request_op::Request::RequestTxn(t)) => txn_may_be_large(t),
            _ => false,
        })
}

/// Runs `read` on the blocking pool when `large`, else here. A panic in it goes on
/// unwinding in the caller, as it would have in place.
pub(crate) async fn read<T, F>(large: bool, read: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if !large {
        return read();
    }
    match tokio::task::spawn_blocking(read).await {
        Ok(answer) => answer,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down and dropped the task before it ran.
            Err(_) => read_cancelled(),
        },
    }
}

fn read_cancelled() -> ! {
    panic!("the runtime shut down while a read was queued on its blocking pool")
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::RequestOp;

    fn range(end: &str, limit: i64) -> RangeRequest {
        RangeRequest {
            key: b"a".to_vec().into(),
            range_end: end.as_bytes().to_vec().into(),
            limit,
            ..Default::default()
        }
    }

    #[test]
    fn only_ranges_that_may_cover_many_keys_leave_the_worker() {
        assert!(!range_may_be_large(&range("", 0)), "one key");
        assert!(!range_may_be_large(&range("b", 500)), "a small page");
        assert!(range_may_be_large(&range("b", 0)), "no limit");
        assert!(range_may_be_large(&range("\0", 5_000)), "a large page");
        let nested = TxnRequest {
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(range("b", 0))),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert!(txn_may_be_large(&nested));
        assert!(!txn_may_be_large(&TxnRequest::default()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_read_runs_off_the_calling_thread() {
        let here = std::thread::current().id();
        let there = read(true, || std::thread::current().id()).await;
        assert_ne!(here, there);
        assert_eq!(read(false, || std::thread::current().id()).await, here);
    }
}
