//! etcd's Auth service, and who a request runs as.
//!
//! - Passwords are hashed with bcrypt on the member that receives them, before anything is
//!   proposed: the clear password never reaches the raft log, a snapshot or a log line.
//!   `Authenticate` checks a password outside raft, then proposes only the user name and a
//!   random token prefix; every member learns the simple token `<prefix>.<raft index>` when
//!   it applies that entry (etcd's `InternalAuthenticateRequest`).
//! - A request's token comes from the gRPC metadata `token` (etcd's clients), else
//!   `authorization` (the JSON gateway's header, with or without `Bearer `).
//! - Writes carry who asked (an `AuthHeader`) and are checked as they are applied (etcd's
//!   auth applier); reads and admin calls are checked here, as etcd's API layer does.

mod jwt;

pub(crate) use jwt::JwtKeys;
pub use jwt::{JwtConfig, DEFAULT_JWT_TTL};

use crate::services::Svc;
use crate::{errors, EtcdServer};
use base64::Engine as _;
use metastore_engine::Engine;
use metastore_mvcc::auth::{AuthError, AuthInfo, Need};
use metastore_mvcc::{ApplyResponse, ClusterVersion};
use metastore_proto::etcdserverpb::auth_server::Auth;
use metastore_proto::etcdserverpb::*;
use metastore_proto::internal::{command::Op, AuthHeader, Authenticate};
use rand::distr::{Alphanumeric, SampleString};
use std::time::Duration;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

/// Auth settings (etcd's flags of the same names).
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// `--bcrypt-cost`.
    pub bcrypt_cost: u32,
    /// `--auth-token-ttl`: how long an unused simple token lives.
    pub token_ttl: Duration,
    /// `--client-cert-auth`: a verified client certificate's common name is the user when
    /// no token is sent.
    pub client_cert_auth: bool,
    /// `--auth-token jwt,...`: JWT tokens instead of simple ones.
    pub jwt: Option<JwtConfig>,
}

impl AuthConfig {
    /// Checks the token settings as etcd does at start (keys that load and match).
    pub fn validate(&self) -> Result<(), String> {
        match &self.jwt {
            Some(cfg) => JwtKeys::new(cfg).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// Who a TLS client's verified certificate names (the connection's info, which tonic puts in
/// every request's extensions).
#[derive(Clone, Debug, Default)]
pub struct TlsClient {
    pub common_name: Option<String>,
}

/// The request header the front layer sets from [`TlsClient`] (after dropping any a client
/// sent): the service code reads metadata, not connection info.
pub const TLS_COMMON_NAME_HEADER: &str = "metastore-internal-tls-common-name";

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            bcrypt_cost: bcrypt::DEFAULT_COST,
            token_ttl: metastore_mvcc::auth::DEFAULT_TOKEN_TTL,
            client_cert_auth: false,
            jwt: None,
        }
    }
}

tokio::task_local! {
    /// Who the Lock or Election call being served runs as: their key operations are checked
    /// as that user's own would be (etcd serves them through a client with the caller's
    /// token).
    pub(crate) static CALLER: Option<AuthInfo>;
}

/// The caller of the Lock or Election call this task serves, if any.
pub(crate) fn caller() -> Option<AuthInfo> {
    CALLER.try_with(|c| c.clone()).ok().flatten()
}

/// The first version whose members know the auth operations.
const AUTH_VERSION: ClusterVersion = ClusterVersion { major: 0, minor: 3 };

fn auth_err(e: AuthError) -> Status {
    errors::from_auth(e)
}

impl<E: Engine> EtcdServer<E> {
    /// etcd's `AuthInfoFromCtx`: None while auth is off or when no token was sent; an
    /// unknown or expired token is `etcdserver: invalid auth token`.
    pub(crate) fn auth_info(&self, metadata: &MetadataMap) -> Result<Option<AuthInfo>, Status> {
        self.resolve_token(metadata).map_err(auth_err)
    }

    pub(crate) fn resolve_token(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Option<AuthInfo>, AuthError> {
        let auth = self.store.auth();
        if !auth.is_enabled() {
            return Ok(None);
        }
        let token = metadata
            .get("token")
            .or_else(|| metadata.get("authorization"))
            .and_then(|v| v.to_str().ok());
        let Some(token) = token else {
            // etcd's AuthInfoFromTLS: the certificate's name, at the current auth revision.
            if self.auth_config.client_cert_auth {
                if let Some(cn) = metadata
                    .get(TLS_COMMON_NAME_HEADER)
                    .and_then(|v| v.to_str().ok())
                {
                    return Ok(Some(AuthInfo {
                        username: cn.to_string(),
                        revision: auth.revision(),
                    }));
                }
            }
            return Ok(None);
        };
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let known = match &self.jwt {
            Some(keys) => keys.verify(token),
            None => auth.simple_token_info(token),
        };
        match known {
            Some(info) => Ok(Some(info)),
            None => {
                tracing::warn!(
                    token_fingerprint = %fingerprint(token),
                    "invalid auth token"
                );
                Err(AuthError::InvalidAuthToken)
            }
        }
    }

    /// etcd's `isWatchPermitted`: READ on the watched range.
    pub(crate) fn watch_permitted(
        &self,
        metadata: &MetadataMap,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        let info = self.resolve_token(metadata)?.unwrap_or_default();
        self.store.auth().check(&info, key, range_end, Need::Read)
    }

    /// etcd 3.5's `requireAuthInfo`: while auth is on, some user must be given.
    pub(crate) fn require_auth_info(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if self.store.auth().is_enabled() && self.auth_info(metadata)?.is_none() {
            return Err(auth_err(AuthError::UserEmpty));
        }
        Ok(())
    }

    /// etcd's `IsAdminPermitted` for the caller.
    pub(crate) fn require_admin(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let info = self.auth_info(metadata)?;
        self.store
            .auth()
            .check_admin(info.as_ref())
            .map_err(auth_err)
    }

    /// etcd's lease checks (`checkLeaseRenew`, `checkLeaseTimeToLive`): a user must be given
    /// while auth is on; root may do anything; others need `need` on every attached key.
    pub(crate) fn check_lease_keys(
        &self,
        metadata: &MetadataMap,
        lease: i64,
        need: Need,
    ) -> Result<(), Status> {
        let auth = self.store.auth();
        if !auth.is_enabled() {
            return Ok(());
        }
        let Some(info) = self.auth_info(metadata)? else {
            return Err(auth_err(AuthError::UserEmpty));
        };
        if auth.check_admin(Some(&info)).is_ok() {
            return Ok(());
        }
        if let Some(l) = self.store.lease(lease, true) {
            for key in &l.keys {
                auth.check(&info, key, &[], need).map_err(auth_err)?;
            }
        }
        Ok(())
    }

    /// etcd's read check (`doSerialize`): READ on `[key, range_end)`.
    pub(crate) fn check_read(
        &self,
        info: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), Status> {
        let nobody = AuthInfo::default();
        self.store
            .auth()
            .check(info.unwrap_or(&nobody), key, range_end, Need::Read)
            .map_err(auth_err)
    }

    /// After a read: the auth store changed while it ran, so its check may be stale (etcd).
    pub(crate) fn recheck_revision(&self, info: Option<&AuthInfo>) -> Result<(), Status> {
        match info {
            Some(i) if i.revision != 0 && i.revision != self.store.auth().revision() => {
                Err(auth_err(AuthError::AuthOldRevision))
            }
            _ => Ok(()),
        }
    }

    /// What a client's command carries to be checked again when applied.
    pub(crate) fn auth_header(info: Option<&AuthInfo>) -> AuthHeader {
        match info {
            Some(i) => AuthHeader {
                username: i.username.clone(),
                revision: i.revision,
            },
            None => AuthHeader::default(),
        }
    }

    /// Waits (briefly) for every member to run a version that knows the auth operations.
    async fn require_auth_version(&self) -> Result<(), Status> {
        for _ in 0..100 {
            if self.store.cluster_version() >= Some(AUTH_VERSION) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Status::failed_precondition(format!(
            "metastore: auth needs every member to run {AUTH_VERSION} or later (cluster version is {})",
            self.store
                .cluster_version()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "not decided yet".into())
        )))
    }

    async fn propose_auth(&self, metadata: &MetadataMap, op: Op) -> Result<ApplyResponse, Status> {
        let info = self.auth_info(metadata)?;
        self.require_auth_version().await?;
        self.submit_as(op, Some(Self::auth_header(info.as_ref())))
            .await
    }

    async fn bcrypt_hash(&self, password: String) -> Result<String, Status> {
        let cost = self.auth_config.bcrypt_cost;
        let hash = tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Status::internal(format!("metastore: hashing a password: {e}")))?
            .map_err(|e| Status::internal(format!("metastore: hashing a password: {e}")))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(hash))
    }

    /// etcd's `CheckPassword`: the auth revision the password was checked at.
    async fn check_password(&self, name: &str, password: String) -> Result<u64, AuthError> {
        let auth = self.store.auth();
        if !auth.is_enabled() {
            return Err(AuthError::AuthNotEnabled);
        }
        let revision = auth.revision();
        let user = auth.user(name).ok_or(AuthError::AuthFailed)?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(AuthError::NoPasswordUser);
        }
        let hash = String::from_utf8_lossy(&user.password).into_owned();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(false);
        if ok {
            Ok(revision)
        } else {
            Err(AuthError::AuthFailed)
        }
    }
}

/// A request sent on to another member (the leader) with the caller's token, so that the
/// member answering it checks the same user.
pub(crate) fn forwarded<T>(message: T, metadata: &MetadataMap) -> Request<T> {
    let mut request = Request::new(message);
    for key in ["token", "authorization"] {
        if let Some(v) = metadata.get(key) {
            request.metadata_mut().insert(key, v.clone());
        }
    }
    request
}

/// A token's first characters, enough to tell tokens apart in a log without making one usable.
fn fingerprint(token: &str) -> String {
    token.chars().take(6).collect::<String>() + "..."
}

macro_rules! auth_change {
    ($self:ident, $request:ident, $op:ident, $resp:ident) => {{
        let metadata = $request.metadata().clone();
        let req = $request.into_inner();
        match $self.0.propose_auth(&metadata, Op::$op(req)).await? {
            ApplyResponse::Auth => Ok(Response::new($resp {
                header: Some($self.0.header($self.0.store.current_revision())),
            })),
            _ => Err(crate::services::unexpected(stringify!($op))),
        }
    }};
}

#[tonic::async_trait]
impl<E: Engine> Auth for Svc<E> {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        auth_change!(self, request, AuthEnable, AuthEnableResponse)
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        auth_change!(self, request, AuthDisable, AuthDisableResponse)
    }

    async fn auth_status(
        &self,
        _request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.read_barrier(false).await?;
        let auth = self.0.store.auth();
        Ok(Response::new(AuthStatusResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            enabled: auth.is_enabled(),
            auth_revision: auth.revision(),
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let AuthenticateRequest { name, password } = request.into_inner();
        self.read_barrier(false).await?;
        loop {
            let checked = match self.0.check_password(&name, password.clone()).await {
                Ok(revision) => revision,
                Err(e) => {
                    if e != AuthError::AuthNotEnabled {
                        metrics::counter!("metastore_auth_failures_total").increment(1);
                        tracing::warn!(user = %name, error = %e, "invalid authentication was requested");
                    }
                    return Err(auth_err(e));
                }
            };
            if let Some(keys) = &self.0.jwt {
                // A JWT needs no raft round: any member holding the key checks it, and its
                // revision claim makes it stale once the auth store changes.
                let token = keys.sign(&name, checked).map_err(Status::unknown)?;
                return Ok(Response::new(AuthenticateResponse {
                    header: Some(self.0.header(self.0.store.current_revision())),
                    token,
                }));
            }
            let prefix = Alphanumeric.sample_string(&mut rand::rng(), 16);
            let op = Op::Authenticate(Authenticate {
                name: name.clone(),
                simple_token: prefix,
            });
            self.0.require_auth_version().await?;
            let token = match self.0.submit(op).await? {
                ApplyResponse::Authenticated(token) => token,
                _ => return Err(crate::services::unexpected("authenticate")),
            };
            // The password may have changed between the check and the token (etcd retries).
            if checked == self.0.store.auth().revision() {
                return Ok(Response::new(AuthenticateResponse {
                    header: Some(self.0.header(self.0.store.current_revision())),
                    token,
                }));
            }
            tracing::info!("revision when password checked became stale; retrying");
        }
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let metadata = request.metadata().clone();
        let mut req = request.into_inner();
        if !req.options.is_some_and(|o| o.no_password) {
            let password = std::mem::take(&mut req.password);
            req.hashed_password = self.0.bcrypt_hash(password).await?;
        }
        req.password.clear();
        match self.0.propose_auth(&metadata, Op::AuthUserAdd(req)).await? {
            ApplyResponse::Auth => Ok(Response::new(AuthUserAddResponse {
                header: Some(self.0.header(self.0.store.current_revision())),
            })),
            _ => Err(crate::services::unexpected("user add")),
        }
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let info = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        self.read_barrier(false).await?;
        let auth = self.0.store.auth();
        // Root may read any user; anyone may read themselves.
        if let Err(e) = auth.check_admin(info.as_ref()) {
            if info.as_ref().is_none_or(|i| i.username != req.name) {
                return Err(auth_err(e));
            }
        }
        let user = auth
            .user(&req.name)
            .ok_or_else(|| auth_err(AuthError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            roles: user.roles,
        }))
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        self.read_barrier(false).await?;
        Ok(Response::new(AuthUserListResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            users: self.0.store.auth().user_names(),
        }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        auth_change!(self, request, AuthUserDelete, AuthUserDeleteResponse)
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let metadata = request.metadata().clone();
        let mut req = request.into_inner();
        let no_password = self
            .0
            .store
            .auth()
            .user(&req.name)
            .and_then(|u| u.options)
            .is_some_and(|o| o.no_password);
        let password = std::mem::take(&mut req.password);
        if !no_password {
            req.hashed_password = self.0.bcrypt_hash(password).await?;
        }
        match self
            .0
            .propose_auth(&metadata, Op::AuthUserChangePassword(req))
            .await?
        {
            ApplyResponse::Auth => Ok(Response::new(AuthUserChangePasswordResponse {
                header: Some(self.0.header(self.0.store.current_revision())),
            })),
            _ => Err(crate::services::unexpected("change password")),
        }
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        auth_change!(self, request, AuthUserGrantRole, AuthUserGrantRoleResponse)
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        auth_change!(
            self,
            request,
            AuthUserRevokeRole,
            AuthUserRevokeRoleResponse
        )
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        auth_change!(self, request, AuthRoleAdd, AuthRoleAddResponse)
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let info = self.0.auth_info(request.metadata())?;
        let req = request.into_inner();
        self.read_barrier(false).await?;
        let auth = self.0.store.auth();
        // Root may read any role; a user may read the roles it holds.
        if let Err(e) = auth.check_admin(info.as_ref()) {
            if info
                .as_ref()
                .is_none_or(|i| !auth.has_role(&i.username, &req.role))
            {
                return Err(auth_err(e));
            }
        }
        let role = auth
            .role(&req.role)
            .ok_or_else(|| auth_err(AuthError::RoleNotFound))?;
        // etcd 3.5 lists what was granted; the root role's power is implicit.
        Ok(Response::new(AuthRoleGetResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            perm: role.key_permission,
        }))
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.0.require_admin(request.metadata())?;
        self.read_barrier(false).await?;
        Ok(Response::new(AuthRoleListResponse {
            header: Some(self.0.header(self.0.store.current_revision())),
            roles: self.0.store.auth().role_names(),
        }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        auth_change!(self, request, AuthRoleDelete, AuthRoleDeleteResponse)
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        auth_change!(
            self,
            request,
            AuthRoleGrantPermission,
            AuthRoleGrantPermissionResponse
        )
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        auth_change!(
            self,
            request,
            AuthRoleRevokePermission,
            AuthRoleRevokePermissionResponse
        )
    }
}
