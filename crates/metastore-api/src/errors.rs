//! etcd's gRPC errors: the same codes and message texts as etcd's `rpctypes`, so clients map
//! them to their typed errors.

use metastore_batch::BatchError;
use metastore_mvcc::MvccError;
use metastore_raft::RaftError;
use tonic::Status;

pub fn empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}
pub fn key_not_found() -> Status {
    Status::invalid_argument("etcdserver: key not found")
}
pub fn value_provided() -> Status {
    Status::invalid_argument("etcdserver: value is provided")
}
pub fn lease_provided() -> Status {
    Status::invalid_argument("etcdserver: lease is provided")
}
pub fn too_many_ops() -> Status {
    Status::invalid_argument("etcdserver: too many operations in txn request")
}
pub fn duplicate_key() -> Status {
    Status::invalid_argument("etcdserver: duplicate key given in txn request")
}
pub fn invalid_sort_option() -> Status {
    Status::invalid_argument("etcdserver: invalid sort option")
}
pub fn request_too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}
pub fn compacted() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
}
pub fn future_rev() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
}
pub fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}
pub fn no_leader() -> Status {
    Status::unavailable("etcdserver: no leader")
}
pub fn timeout() -> Status {
    Status::unavailable("etcdserver: request timed out")
}
pub fn stopped() -> Status {
    Status::unavailable("etcdserver: server stopped")
}

pub fn from_mvcc(e: MvccError) -> Status {
    match e {
        MvccError::Compacted => compacted(),
        MvccError::FutureRev => future_rev(),
        MvccError::LeaseNotFound => lease_not_found(),
        MvccError::KeyNotFound => key_not_found(),
        MvccError::Engine(_) | MvccError::Corrupt(..) => {
            Status::internal(format!("etcdserver: {e}"))
        }
    }
}

pub fn from_raft(e: RaftError) -> Status {
    match e {
        RaftError::NoLeader => no_leader(),
        RaftError::ProposalDropped => Status::unavailable("etcdserver: proposal dropped"),
        RaftError::Stopped => stopped(),
        other => Status::unavailable(format!("etcdserver: {other}")),
    }
}

pub fn from_batch(e: BatchError) -> Status {
    match e {
        BatchError::Timeout => timeout(),
        BatchError::Stopped => stopped(),
        BatchError::Rejected(reason) if reason == RaftError::NoLeader.to_string() => no_leader(),
        BatchError::Rejected(reason) => Status::unavailable(format!("etcdserver: {reason}")),
    }
}
