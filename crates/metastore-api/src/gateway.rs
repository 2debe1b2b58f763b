//! etcd's JSON gateway (grpc-gateway v1, as etcd 3.5 serves it): every `POST /v3/...` route of
//! etcd's API, with `/v3beta/...` aliases, on the client port.
//!
//! As in etcd, the gateway is a gRPC client of this member's own listener: a JSON request
//! becomes the gRPC call a client would make, so auth, limits, the learner gate and the metrics
//! all apply unchanged. The JSON mapping is grpc-gateway's `JSONPb{OrigName: true}` (generated
//! by pbjson): proto field names as declared, 64-bit integers as strings, bytes as base64, enum
//! names, zero values left out. Unary answers are one JSON object; streams (Watch,
//! LeaseKeepAlive, Observe, Snapshot) answer one `{"result":...}` line per message; errors are
//! `{"error":..,"code":..,"message":..}` with grpc-gateway's HTTP status for the gRPC code.

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::{Stream, StreamExt};
use http::{header, HeaderMap, StatusCode};
use metastore_proto::etcdserverpb as pb;
use metastore_proto::{v3electionpb as election, v3lockpb as lock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// The gateway's connection to this member's own gRPC listener.
#[derive(Clone)]
struct Gateway {
    channel: Channel,
}

/// A channel to a gRPC server at the other end of in-memory pipes, and the stream of those
/// pipes' server ends, for `Server::serve_with_incoming`. The gateway calls the member's own
/// services through it: no socket, so it works the same over plain TCP and TLS listeners (and
/// never presents a client certificate, as etcd ignores its gateway's certificate name).
pub fn in_process_channel() -> (
    Channel,
    tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio::io::DuplexStream>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let tx = tx.clone();
        async move {
            let (client, server) = tokio::io::duplex(256 * 1024);
            tx.send(Ok(server))
                .await
                .map_err(|_| std::io::Error::other("the in-process server has stopped"))?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://in-process.invalid")
        .connect_with_connector_lazy(connector);
    (channel, tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The gateway routes, calling the gRPC services through `channel`.
pub fn gateway_routes(channel: Channel) -> axum::Router {
    let gw = Gateway { channel };
    let mut router = axum::Router::new();
    macro_rules! unary {
        ($($grpc:literal : $req:ty => $resp:ty = [$($http:literal),+]),* $(,)?) => {$(
            for path in [$($http),+] {
                let gw = gw.clone();
                let handler = move |headers: HeaderMap, body: Bytes| {
                    let gw = gw.clone();
                    async move { gw.unary::<$req, $resp>($grpc, &headers, body).await }
                };
                router = router
                    .route(path, post(handler.clone()))
                    .route(&path.replacen("/v3/", "/v3beta/", 1), post(handler));
            }
        )*};
    }
    unary! {
        "/etcdserverpb.KV/Range": pb::RangeRequest => pb::RangeResponse = ["/v3/kv/range"],
        "/etcdserverpb.KV/Put": pb::PutRequest => pb::PutResponse = ["/v3/kv/put"],
        "/etcdserverpb.KV/DeleteRange": pb::DeleteRangeRequest => pb::DeleteRangeResponse = ["/v3/kv/deleterange"],
        "/etcdserverpb.KV/Txn": pb::TxnRequest => pb::TxnResponse = ["/v3/kv/txn"],
        "/etcdserverpb.KV/Compact": pb::CompactionRequest => pb::CompactionResponse = ["/v3/kv/compaction"],
        "/etcdserverpb.Lease/LeaseGrant": pb::LeaseGrantRequest => pb::LeaseGrantResponse = ["/v3/lease/grant"],
        "/etcdserverpb.Lease/LeaseRevoke": pb::LeaseRevokeRequest => pb::LeaseRevokeResponse = ["/v3/lease/revoke", "/v3/kv/lease/revoke"],
        "/etcdserverpb.Lease/LeaseTimeToLive": pb::LeaseTimeToLiveRequest => pb::LeaseTimeToLiveResponse = ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"],
        "/etcdserverpb.Lease/LeaseLeases": pb::LeaseLeasesRequest => pb::LeaseLeasesResponse = ["/v3/lease/leases", "/v3/kv/lease/leases"],
        "/etcdserverpb.Cluster/MemberAdd": pb::MemberAddRequest => pb::MemberAddResponse = ["/v3/cluster/member/add"],
        "/etcdserverpb.Cluster/MemberRemove": pb::MemberRemoveRequest => pb::MemberRemoveResponse = ["/v3/cluster/member/remove"],
        "/etcdserverpb.Cluster/MemberUpdate": pb::MemberUpdateRequest => pb::MemberUpdateResponse = ["/v3/cluster/member/update"],
        "/etcdserverpb.Cluster/MemberList": pb::MemberListRequest => pb::MemberListResponse = ["/v3/cluster/member/list"],
        "/etcdserverpb.Cluster/MemberPromote": pb::MemberPromoteRequest => pb::MemberPromoteResponse = ["/v3/cluster/member/promote"],
        "/etcdserverpb.Maintenance/Alarm": pb::AlarmRequest => pb::AlarmResponse = ["/v3/maintenance/alarm"],
        "/etcdserverpb.Maintenance/Status": pb::StatusRequest => pb::StatusResponse = ["/v3/maintenance/status"],
        "/etcdserverpb.Maintenance/Defragment": pb::DefragmentRequest => pb::DefragmentResponse = ["/v3/maintenance/defragment"],
        "/etcdserverpb.Maintenance/Hash": pb::HashRequest => pb::HashResponse = ["/v3/maintenance/hash"],
        "/etcdserverpb.Maintenance/HashKV": pb::HashKvRequest => pb::HashKvResponse = ["/v3/maintenance/hashkv"],
        "/etcdserverpb.Maintenance/MoveLeader": pb::MoveLeaderRequest => pb::MoveLeaderResponse = ["/v3/maintenance/transfer-leadership"],
        "/etcdserverpb.Maintenance/Downgrade": pb::DowngradeRequest => pb::DowngradeResponse = ["/v3/maintenance/downgrade"],
        "/etcdserverpb.Auth/AuthEnable": pb::AuthEnableRequest => pb::AuthEnableResponse = ["/v3/auth/enable"],
        "/etcdserverpb.Auth/AuthDisable": pb::AuthDisableRequest => pb::AuthDisableResponse = ["/v3/auth/disable"],
        "/etcdserverpb.Auth/AuthStatus": pb::AuthStatusRequest => pb::AuthStatusResponse = ["/v3/auth/status"],
        "/etcdserverpb.Auth/Authenticate": pb::AuthenticateRequest => pb::AuthenticateResponse = ["/v3/auth/authenticate"],
        "/etcdserverpb.Auth/UserAdd": pb::AuthUserAddRequest => pb::AuthUserAddResponse = ["/v3/auth/user/add"],
        "/etcdserverpb.Auth/UserGet": pb::AuthUserGetRequest => pb::AuthUserGetResponse = ["/v3/auth/user/get"],
        "/etcdserverpb.Auth/UserList": pb::AuthUserListRequest => pb::AuthUserListResponse = ["/v3/auth/user/list"],
        "/etcdserverpb.Auth/UserDelete": pb::AuthUserDeleteRequest => pb::AuthUserDeleteResponse = ["/v3/auth/user/delete"],
        "/etcdserverpb.Auth/UserChangePassword": pb::AuthUserChangePasswordRequest => pb::AuthUserChangePasswordResponse = ["/v3/auth/user/changepw"],
        "/etcdserverpb.Auth/UserGrantRole": pb::AuthUserGrantRoleRequest => pb::AuthUserGrantRoleResponse = ["/v3/auth/user/grant"],
        "/etcdserverpb.Auth/UserRevokeRole": pb::AuthUserRevokeRoleRequest => pb::AuthUserRevokeRoleResponse = ["/v3/auth/user/revoke"],
        "/etcdserverpb.Auth/RoleAdd": pb::AuthRoleAddRequest => pb::AuthRoleAddResponse = ["/v3/auth/role/add"],
        "/etcdserverpb.Auth/RoleGet": pb::AuthRoleGetRequest => pb::AuthRoleGetResponse = ["/v3/auth/role/get"],
        "/etcdserverpb.Auth/RoleList": pb::AuthRoleListRequest => pb::AuthRoleListResponse = ["/v3/auth/role/list"],
        "/etcdserverpb.Auth/RoleDelete": pb::AuthRoleDeleteRequest => pb::AuthRoleDeleteResponse = ["/v3/auth/role/delete"],
        "/etcdserverpb.Auth/RoleGrantPermission": pb::AuthRoleGrantPermissionRequest => pb::AuthRoleGrantPermissionResponse = ["/v3/auth/role/grant"],
        "/etcdserverpb.Auth/RoleRevokePermission": pb::AuthRoleRevokePermissionRequest => pb::AuthRoleRevokePermissionResponse = ["/v3/auth/role/revoke"],
        "/v3lockpb.Lock/Lock": lock::LockRequest => lock::LockResponse = ["/v3/lock/lock"],
        "/v3lockpb.Lock/Unlock": lock::UnlockRequest => lock::UnlockResponse = ["/v3/lock/unlock"],
        "/v3electionpb.Election/Campaign": election::CampaignRequest => election::CampaignResponse = ["/v3/election/campaign"],
        "/v3electionpb.Election/Proclaim": election::ProclaimRequest => election::ProclaimResponse = ["/v3/election/proclaim"],
        "/v3electionpb.Election/Leader": election::LeaderRequest => election::LeaderResponse = ["/v3/election/leader"],
        "/v3electionpb.Election/Resign": election::ResignRequest => election::ResignResponse = ["/v3/election/resign"],
    }
    macro_rules! streaming {
        ($method:ident, $($grpc:literal : $req:ty => $resp:ty = $http:literal),* $(,)?) => {$(
            let gw2 = gw.clone();
            let handler = move |headers: HeaderMap, body: Body| {
                let gw = gw2.clone();
                async move { gw.$method::<$req, $resp>($grpc, &headers, body).await }
            };
            router = router
                .route($http, post(handler.clone()))
                .route(&$http.replacen("/v3/", "/v3beta/", 1), post(handler));
        )*};
    }
    streaming! {
        bidi,
        "/etcdserverpb.Watch/Watch": pb::WatchRequest => pb::WatchResponse = "/v3/watch",
        "/etcdserverpb.Lease/LeaseKeepAlive": pb::LeaseKeepAliveRequest => pb::LeaseKeepAliveResponse = "/v3/lease/keepalive",
    }
    streaming! {
        server_stream,
        "/v3electionpb.Election/Observe": election::LeaderRequest => election::LeaderResponse = "/v3/election/observe",
        "/etcdserverpb.Maintenance/Snapshot": pb::SnapshotRequest => pb::SnapshotResponse = "/v3/maintenance/snapshot",
    }
    router
}

impl Gateway {
    async fn ready(&self) -> Result<Grpc<Channel>, tonic::Status> {
        let mut grpc = Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(grpc)
    }

    async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response
    where
        Req: prost::Message + Default + DeserializeOwned + Send + Sync + 'static,
        Resp: prost::Message + Default + Serialize + Send + Sync + 'static,
    {
        let request: Req = match decode(&body) {
            Ok(r) => r,
            Err(status) => return error_response(&status),
        };
        let mut grpc = match self.ready().await {
            Ok(g) => g,
            Err(status) => return error_response(&status),
        };
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        match grpc
            .unary(
                with_auth(request, headers),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
        {
            Ok(response) => json_response(&response.into_inner()),
            Err(status) => error_response(&status),
        }
    }

    async fn server_stream<Req, Resp>(
        &self,
        path: &'static str,
        headers: &HeaderMap,
        body: Body,
    ) -> Response
    where
        Req: prost::Message + Default + DeserializeOwned + Send + Sync + 'static,
        Resp: prost::Message + Default + Serialize + Send + Sync + 'static,
    {
        let body = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(b) => b,
            Err(e) => return error_response(&tonic::Status::invalid_argument(e.to_string())),
        };
        let request: Req = match decode(&body) {
            Ok(r) => r,
            Err(status) => return error_response(&status),
        };
        let mut grpc = match self.ready().await {
            Ok(g) => g,
            Err(status) => return error_response(&status),
        };
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        match grpc
            .server_streaming(
                with_auth(request, headers),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
        {
            Ok(response) => stream_response(response.into_inner()),
            Err(status) => error_response(&status),
        }
    }

    async fn bidi<Req, Resp>(&self, path: &'static str, headers: &HeaderMap, body: Body) -> Response
    where
        Req: prost::Message + Default + DeserializeOwned + Send + Sync + 'static,
        Resp: prost::Message + Default + Serialize + Send + Sync + 'static,
    {
        let mut grpc = match self.ready().await {
            Ok(g) => g,
            Err(status) => return error_response(&status),
        };
        // grpc-gateway reads the request body as a sequence of JSON objects, one message each;
        // one that does not parse ends the client's side.
        let requests = json_objects(body.into_data_stream()).filter_map(|object| async move {
            match serde_json::from_slice::<Req>(&object) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!(error = %e, "gateway: undecodable stream message dropped");
                    None
                }
            }
        });
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let mut request = tonic::Request::new(requests);
        forward_auth(headers, request.metadata_mut());
        match grpc
            .streaming(request, PathAndQuery::from_static(path), codec)
            .await
        {
            Ok(response) => stream_response(response.into_inner()),
            Err(status) => error_response(&status),
        }
    }
}

/// A request body: empty means the default message, as grpc-gateway decodes it.
fn decode<Req: Default + DeserializeOwned>(body: &[u8]) -> Result<Req, tonic::Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Req::default());
    }
    serde_json::from_slice(body).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

fn with_auth<T>(message: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    forward_auth(headers, request.metadata_mut());
    request
}

/// grpc-gateway passes `Authorization` on as gRPC metadata; etcd reads the token from it.
fn forward_auth(headers: &HeaderMap, metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        metadata.insert("authorization", value);
    }
}

fn json_response<T: Serialize>(message: &T) -> Response {
    match serde_json::to_vec(message) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error_response(&tonic::Status::internal(e.to_string())),
    }
}

/// grpc-gateway v1's `HTTPStatusFromCode`.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::REQUEST_TIMEOUT,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// grpc-gateway v1's error body, fields in its order.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// grpc-gateway v1's error in a stream.
#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

/// The answer to a failed unary call (or a stream that fails at once).
fn error_response(status: &tonic::Status) -> Response {
    let body = ErrorBody {
        error: status.message(),
        message: status.message(),
        code: status.code() as i32,
    };
    (
        http_status(status.code()),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

/// One `{"result":...}` line per message; an error ends the stream with grpc-gateway's
/// stream error object.
fn stream_response<Resp, S>(messages: S) -> Response
where
    Resp: Serialize + Send + 'static,
    S: Stream<Item = Result<Resp, tonic::Status>> + Send + 'static,
{
    let lines = messages.map(|item| {
        // Written by hand around the message so that its fields keep their proto order.
        let line = match item.and_then(|message| {
            serde_json::to_string(&message).map_err(|e| tonic::Status::internal(e.to_string()))
        }) {
            Ok(message) => format!("{{\"result\":{message}}}\n"),
            Err(status) => {
                let error = StreamError {
                    grpc_code: status.code() as i32,
                    http_code: http_status(status.code()).as_u16(),
                    message: status.message(),
                    http_status: http_status(status.code())
                        .canonical_reason()
                        .unwrap_or_default(),
                };
                match serde_json::to_string(&error) {
                    Ok(error) => format!("{{\"error\":{error}}}\n"),
                    Err(_) => String::new(),
                }
            }
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Splits a byte stream into top-level JSON objects (`{...}`, whatever whitespace or newlines
/// separate them), as Go's `json.Decoder` reads a stream of values.
fn json_objects<S, E>(chunks: S) -> impl Stream<Item = Vec<u8>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    futures::stream::unfold(
        (Box::pin(chunks), ObjectSplitter::default(), false),
        |(mut chunks, mut splitter, mut done)| async move {
            loop {
                if let Some(object) = splitter.next_object() {
                    return Some((object, (chunks, splitter, done)));
                }
                if done {
                    return None;
                }
                match chunks.next().await {
                    Some(Ok(bytes)) => splitter.push(&bytes),
                    _ => done = true,
                }
            }
        },
    )
}

/// Finds complete top-level JSON objects in bytes that arrive piece by piece.
#[derive(Default)]
struct ObjectSplitter {
    buffer: Vec<u8>,
}

impl ObjectSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    fn next_object(&mut self) -> Option<Vec<u8>> {
        let start = self.buffer.iter().position(|b| !b.is_ascii_whitespace())?;
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, &b) in self.buffer.iter().enumerate().skip(start) {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        let object = self.buffer[start..=i].to_vec();
                        self.buffer.drain(..=i);
                        return Some(object);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_split_across_chunks_and_strings() {
        let mut s = ObjectSplitter::default();
        s.push(br#" {"a":"}{\"","b":[1,{"c":2}]}"#);
        s.push(b"\n{\"d\"");
        assert_eq!(
            s.next_object().as_deref(),
            Some(&br#"{"a":"}{\"","b":[1,{"c":2}]}"#[..])
        );
        assert_eq!(s.next_object(), None);
        s.push(b":1}\n");
        assert_eq!(s.next_object().as_deref(), Some(&b"{\"d\":1}"[..]));
        assert_eq!(s.next_object(), None);
    }

    #[test]
    fn codes_map_to_grpc_gateways_statuses() {
        assert_eq!(http_status(tonic::Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(tonic::Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(tonic::Code::Cancelled),
            StatusCode::REQUEST_TIMEOUT
        );
    }
}
