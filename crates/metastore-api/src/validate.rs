//! Request checks done before anything is proposed, as etcd's `api/v3rpc/key.go` does them.

use crate::errors;
use metastore_proto::etcdserverpb::{
    range_request, request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use std::collections::HashSet;
use tonic::Status;

pub fn check_range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(errors::invalid_sort_option());
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(errors::value_provided());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(errors::lease_provided());
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    Ok(())
}

/// Deepest txn nesting accepted. Each level adds two protobuf message levels, and the raft
/// entry wraps the request in two more; prost refuses to decode past 100 levels, so a deeper
/// txn would be accepted from the client yet fail to decode when it is applied.
pub const MAX_TXN_DEPTH: usize = 32;

pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), Status> {
    check_txn_at(r, max_txn_ops, 1)
}

fn check_txn_at(r: &TxnRequest, max_txn_ops: usize, depth: usize) -> Result<(), Status> {
    if depth > MAX_TXN_DEPTH {
        return Err(Status::invalid_argument(format!(
            "metastore: txn nesting is deeper than {MAX_TXN_DEPTH} levels"
        )));
    }
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_txn_ops {
        return Err(errors::too_many_ops());
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(errors::empty_key());
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(x)) => check_range(x)?,
            Some(request_op::Request::RequestPut(x)) => check_put(x)?,
            Some(request_op::Request::RequestDeleteRange(x)) => check_delete(x)?,
            Some(request_op::Request::RequestTxn(x)) => check_txn_at(x, max_txn_ops, depth + 1)?,
            None => {}
        }
    }
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

/// A delete's key interval, compared byte-wise as etcd's string intervals are; an empty end
/// means "this key only".
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => self.start == key,
            Some(end) => self.start.as_slice() <= key && key < end.as_slice(),
        }
    }
}

/// etcd's `checkIntervals`: no key may be put twice, or put and deleted, in one branch (nested
/// txns included; the then/else of one nested txn may put the same key, being exclusive).
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), Status> {
    let mut dels: Vec<Interval> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => Some(Interval {
                start: d.key.to_vec(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.to_vec()),
            }),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Interval], k: &[u8]| dels.iter().any(|iv| iv.contains(k));
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(request_op::Request::RequestPut(p)) = &op.request else {
            continue;
        };
        let k = p.key.to_vec();
        if puts.contains(&k) || deleted(&dels, &k) {
            return Err(errors::duplicate_key());
        }
        puts.insert(k);
    }
    Ok((puts, dels))
}

/// etcd's `isTxnSerializable`: every op of both branches is a serializable range.
pub fn txn_is_serializable(r: &TxnRequest) -> bool {
    r.success.iter().chain(r.failure.iter()).all(
        |op| matches!(&op.request, Some(request_op::Request::RequestRange(x)) if x.serializable),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::DeleteRangeRequest;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.as_bytes().to_vec().into(),
                    range_end: end.as_bytes().to_vec().into(),
                    prev_kv: false,
                },
            )),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }
    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(t)),
        }
    }

    #[test]
    fn duplicate_and_overlapping_keys() {
        assert!(check_txn(&txn(vec![put("a"), put("b")], vec![put("a")]), 128).is_ok());
        assert!(check_txn(&txn(vec![put("a"), put("a")], vec![]), 128).is_err());
        assert!(check_txn(&txn(vec![put("b"), del("a", "c")], vec![]), 128).is_err());
        assert!(check_txn(&txn(vec![put("c"), del("a", "c")], vec![]), 128).is_ok());
        assert!(check_txn(&txn(vec![put("a"), del("a", "")], vec![]), 128).is_err());
        // then/else of a nested txn are exclusive.
        let inner = txn(vec![put("x")], vec![put("x")]);
        assert!(check_txn(&txn(vec![nested(inner)], vec![]), 128).is_ok());
        let inner = txn(vec![put("x")], vec![]);
        assert!(check_txn(&txn(vec![nested(inner), put("x")], vec![]), 128).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_it_reaches_raft() {
        let mut t = txn(vec![put("x")], vec![]);
        for _ in 0..MAX_TXN_DEPTH - 1 {
            t = txn(vec![nested(t)], vec![]);
        }
        assert!(check_txn(&t, 128).is_ok());
        let t = txn(vec![nested(t)], vec![]);
        assert_eq!(
            check_txn(&t, 128).expect_err("too deep").code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn too_many_ops() {
        let ops: Vec<_> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        let err = check_txn(&txn(ops, vec![]), 128).expect_err("too many");
        assert_eq!(
            err.message(),
            "etcdserver: too many operations in txn request"
        );
    }
}
