//! etcd's gRPC errors: the same codes and message texts as etcd's `rpctypes`, so clients map
//! them to their typed errors.

use metastore_batch::BatchError;
use metastore_mvcc::auth::AuthError;
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
pub fn lease_exists() -> Status {
    Status::failed_precondition("etcdserver: lease already exists")
}
pub fn lease_ttl_too_large() -> Status {
    Status::out_of_range("etcdserver: too large lease TTL")
}
pub fn no_space() -> Status {
    Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
}
/// etcd's `ErrGRPCTooManyRequests`: applying lags committing too far, or too many request
/// bytes are queued for proposal.
pub fn too_many_requests() -> Status {
    Status::resource_exhausted("etcdserver: too many requests")
}
pub fn no_leader() -> Status {
    Status::unavailable("etcdserver: no leader")
}
pub fn timeout() -> Status {
    Status::unavailable("etcdserver: request timed out")
}
pub fn leader_changed() -> Status {
    Status::unavailable("etcdserver: leader changed")
}
pub fn stopped() -> Status {
    Status::unavailable("etcdserver: server stopped")
}

pub fn not_leader() -> Status {
    Status::failed_precondition("etcdserver: not leader")
}
pub fn bad_leader_transferee() -> Status {
    Status::failed_precondition("etcdserver: bad leader transferee")
}
pub fn leader_transfer_timeout() -> Status {
    Status::unavailable("etcdserver: request timed out, leader transfer took too long")
}
pub fn member_exist() -> Status {
    Status::failed_precondition("etcdserver: member ID already exist")
}
pub fn peer_url_exist() -> Status {
    Status::failed_precondition("etcdserver: Peer URLs already exists")
}
pub fn member_not_enough_started() -> Status {
    Status::failed_precondition(
        "etcdserver: re-configuration failed due to not enough started members",
    )
}
pub fn member_bad_urls() -> Status {
    Status::invalid_argument("etcdserver: given member URLs are invalid")
}
pub fn member_not_found() -> Status {
    Status::not_found("etcdserver: member not found")
}
pub fn member_not_learner() -> Status {
    Status::failed_precondition("etcdserver: can only promote a learner member")
}
pub fn learner_not_ready() -> Status {
    Status::failed_precondition(
        "etcdserver: can only promote a learner member which is in sync with leader",
    )
}
pub fn too_many_learners() -> Status {
    Status::failed_precondition("etcdserver: too many learner members in cluster")
}
pub fn unhealthy() -> Status {
    Status::unavailable("etcdserver: unhealthy cluster")
}
pub fn not_supported_for_learner() -> Status {
    Status::failed_precondition("etcdserver: rpc not supported for learner")
}

pub fn from_mvcc(e: MvccError) -> Status {
    match e {
        MvccError::Compacted => compacted(),
        MvccError::FutureRev => future_rev(),
        MvccError::LeaseNotFound => lease_not_found(),
        MvccError::KeyNotFound => key_not_found(),
        MvccError::LeaseExists => lease_exists(),
        MvccError::NoSpace => no_space(),
        MvccError::Auth(a) => from_auth(a),
        // grpc-go's answer to a response over the server's send limit, which etcd clients get.
        MvccError::ResponseTooLarge { size, limit } => Status::resource_exhausted(format!(
            "grpc: trying to send message larger than max ({size} vs. {limit})"
        )),
        MvccError::Engine(_)
        | MvccError::Corrupt(..)
        | MvccError::Downgrade { .. }
        | MvccError::UnknownCommand(_)
        | MvccError::InstallInterrupted(_)
        | MvccError::Thread(..) => Status::internal(format!("etcdserver: {e}")),
    }
}

/// etcd's `rpctypes` auth errors (and `ErrNoPasswordUser`, which etcd passes on as an
/// unknown error with its own text).
pub fn from_auth(e: AuthError) -> Status {
    use AuthError as A;
    match e {
        A::RootUserNotExist => Status::failed_precondition("etcdserver: root user does not exist"),
        A::RootRoleNotExist => {
            Status::failed_precondition("etcdserver: root user does not have root role")
        }
        A::UserAlreadyExist => Status::failed_precondition("etcdserver: user name already exists"),
        A::UserEmpty => Status::invalid_argument("etcdserver: user name is empty"),
        A::UserNotFound => Status::failed_precondition("etcdserver: user name not found"),
        A::RoleAlreadyExist => Status::failed_precondition("etcdserver: role name already exists"),
        A::RoleNotFound => Status::failed_precondition("etcdserver: role name not found"),
        A::RoleEmpty => Status::invalid_argument("etcdserver: role name is empty"),
        A::AuthFailed => Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ),
        A::PermissionNotGiven => Status::invalid_argument("etcdserver: permission not given"),
        A::PermissionDenied => Status::permission_denied("etcdserver: permission denied"),
        A::RoleNotGranted => {
            Status::failed_precondition("etcdserver: role is not granted to the user")
        }
        A::PermissionNotGranted => {
            Status::failed_precondition("etcdserver: permission is not granted to the role")
        }
        A::AuthNotEnabled => {
            Status::failed_precondition("etcdserver: authentication is not enabled")
        }
        A::InvalidAuthToken => Status::unauthenticated("etcdserver: invalid auth token"),
        A::InvalidAuthMgmt => Status::invalid_argument("etcdserver: invalid auth management"),
        A::AuthOldRevision => Status::invalid_argument("etcdserver: revision of auth store is old"),
        A::NoPasswordUser => Status::unknown(e.to_string()),
    }
}

/// What a watch create refused by auth is canceled with: grpc-go's rendering of the status
/// (etcd puts `rpctypes.ErrGRPC...Error()` in the cancel reason).
pub fn watch_cancel_reason(e: AuthError) -> String {
    let status = from_auth(e);
    let code = match status.code() {
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        _ => "Unknown",
    };
    format!("rpc error: code = {code} desc = {}", status.message())
}

pub fn from_raft(e: RaftError) -> Status {
    match e {
        RaftError::NoLeader => no_leader(),
        RaftError::ProposalDropped => Status::unavailable("etcdserver: proposal dropped"),
        RaftError::Stopped => stopped(),
        RaftError::NotLeader => not_leader(),
        other => Status::unavailable(format!("etcdserver: {other}")),
    }
}

pub fn from_batch(e: BatchError) -> Status {
    match e {
        BatchError::Timeout => timeout(),
        BatchError::Stopped => stopped(),
        BatchError::LeaderChanged => leader_changed(),
        BatchError::TooManyRequests => too_many_requests(),
        BatchError::Rejected(reason) => match reason.downcast_ref::<RaftError>() {
            Some(RaftError::NoLeader) => no_leader(),
            _ => Status::unavailable(format!("etcdserver: {reason}")),
        },
    }
}

/// Rewrites tonic's answer to an over-limit request message (`OutOfRange`, "decoded message
/// length too large") into grpc-go's (`ResourceExhausted`, "grpc: received message larger than
/// max"), which is what etcd clients get from etcd and map to their errors.
pub fn grpc_go_size_error<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers();
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some("11") {
        return resp;
    }
    let Some(message) = headers.get("grpc-message").and_then(|v| v.to_str().ok()) else {
        return resp;
    };
    let message = message.replace("%20", " ");
    if !message.contains("decoded message length too large") {
        return resp;
    }
    let numbers: Vec<&str> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let text = match numbers.as_slice() {
        [found, limit, ..] => {
            format!("grpc: received message larger than max ({found} vs. {limit})")
        }
        _ => "grpc: received message larger than max".to_string(),
    };
    let headers = resp.headers_mut();
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&text.replace(' ', "%20")) {
        headers.insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_decode_error_becomes_resource_exhausted() {
        let resp = Status::out_of_range(
            "Error, decoded message length too large: found 2621451 bytes, the limit is: 2097152 bytes",
        )
        .into_http::<()>();
        let resp = grpc_go_size_error(resp);
        let status = Status::from_header_map(resp.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "grpc: received message larger than max (2621451 vs. 2097152)"
        );
        // Other errors pass through untouched.
        let other = grpc_go_size_error(errors_compacted_http());
        let status = Status::from_header_map(other.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }

    fn errors_compacted_http() -> http::Response<()> {
        compacted().into_http::<()>()
    }
}
