//! Applying auth: the auth store's changes (etcd's `authStore` methods, with its rules and
//! errors), and the permission checks etcd's `authApplierV3` makes when a client's write is
//! applied, so that a permission revoked after a request was checked still stops it.

use super::{ApplyResponse, Store, WriteCtx};
use crate::auth::{
    has_root_role, role_key, user_key, valid_permission_range, AuthError, AuthInfo, Need,
    ROOT_ROLE, ROOT_USER,
};
use crate::snapshot::{AUTH_ENABLED, AUTH_REVISION};
use crate::MvccError;
use base64::Engine as _;
use metastore_engine::{Engine, Space};
use metastore_proto::authpb::{Permission, Role, User, UserAddOptions};
use metastore_proto::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
use metastore_proto::internal::{command::Op, AuthHeader, Command};
use prost::Message;

type Result<T> = std::result::Result<T, MvccError>;

/// Whether an operation changes the auth store (and so needs the root role while auth is on).
pub(crate) fn is_auth_admin_op(op: &Op) -> bool {
    matches!(
        op,
        Op::AuthEnable(_)
            | Op::AuthDisable(_)
            | Op::AuthUserAdd(_)
            | Op::AuthUserDelete(_)
            | Op::AuthUserChangePassword(_)
            | Op::AuthUserGrantRole(_)
            | Op::AuthUserRevokeRole(_)
            | Op::AuthRoleAdd(_)
            | Op::AuthRoleDelete(_)
            | Op::AuthRoleGrantPermission(_)
            | Op::AuthRoleRevokePermission(_)
    )
}

/// Whether an operation is one of the auth operations added in 0.3.
pub fn is_auth_op(op: &Op) -> bool {
    is_auth_admin_op(op) || matches!(op, Op::Authenticate(_))
}

fn info(h: &AuthHeader) -> AuthInfo {
    AuthInfo {
        username: h.username.clone(),
        revision: h.revision,
    }
}

impl<E: Engine> Store<E> {
    /// etcd's auth applier: a client's command is checked again as it is applied. Commands
    /// without a header are the members' own (lease expiry, auto-compaction) and pass.
    pub(super) fn check_command_auth(&self, cmd: &Command) -> Result<()> {
        let auth = &self.auth;
        let (Some(h), Some(op)) = (&cmd.auth, &cmd.op) else {
            return Ok(());
        };
        if !auth.is_enabled() {
            return Ok(());
        }
        let info = info(h);
        match op {
            Op::Put(p) => self.check_put_auth(&info, p)?,
            Op::DeleteRange(d) => {
                auth.check(&info, &d.key, &d.range_end, Need::Write)?;
                if d.prev_kv {
                    auth.check(&info, &d.key, &d.range_end, Need::Read)?;
                }
            }
            Op::Txn(t) => self.check_txn_auth(&info, t)?,
            Op::LeaseRevoke(r) => self.check_lease_puts(&info, r.id)?,
            op if is_auth_admin_op(op) => auth.check_admin(Some(&info))?,
            _ => {}
        }
        Ok(())
    }

    fn check_put_auth(&self, info: &AuthInfo, p: &PutRequest) -> Result<()> {
        self.auth.check(info, &p.key, &[], Need::Write)?;
        self.check_lease_puts(info, p.lease)?;
        if p.prev_kv {
            self.auth.check(info, &p.key, &[], Need::Read)?;
        }
        Ok(())
    }

    /// etcd's `checkLeasePuts`: attaching to (or revoking) a lease needs write permission on
    /// every key already attached to it, unless the user is root.
    pub fn check_lease_puts(&self, info: &AuthInfo, lease: i64) -> Result<()> {
        if lease == 0 || !self.auth.is_enabled() {
            return Ok(());
        }
        let Some(l) = self.leases.get(lease, true) else {
            return Ok(());
        };
        if self.auth.check_admin(Some(info)).is_ok() {
            return Ok(());
        }
        for key in &l.keys {
            self.auth.check(info, key, &[], Need::Write)?;
        }
        Ok(())
    }

    /// etcd's `checkTxnPermission`: every compare and every operation of both branches,
    /// nested txns included.
    pub fn check_txn_auth(&self, info: &AuthInfo, t: &TxnRequest) -> Result<()> {
        for c in &t.compare {
            self.auth.check(info, &c.key, &c.range_end, Need::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            self.check_request_op_auth(info, op)?;
        }
        Ok(())
    }

    fn check_request_op_auth(&self, info: &AuthInfo, op: &RequestOp) -> Result<()> {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                self.auth.check(info, &r.key, &r.range_end, Need::Read)?
            }
            Some(request_op::Request::RequestPut(p)) => self.check_put_auth(info, p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => {
                if d.prev_kv {
                    self.auth.check(info, &d.key, &d.range_end, Need::Read)?;
                }
                self.auth.check(info, &d.key, &d.range_end, Need::Write)?;
            }
            Some(request_op::Request::RequestTxn(t)) => self.check_txn_auth(info, t)?,
            None => {}
        }
        Ok(())
    }

    fn save_user(&self, user: &User, ctx: &mut WriteCtx) {
        let name = String::from_utf8_lossy(&user.name).into_owned();
        ctx.batch
            .put(Space::Meta, user_key(&name), user.encode_to_vec());
        self.auth.state.write().users.insert(name, user.clone());
    }

    fn save_role(&self, role: &Role, ctx: &mut WriteCtx) {
        let name = String::from_utf8_lossy(&role.name).into_owned();
        ctx.batch
            .put(Space::Meta, role_key(&name), role.encode_to_vec());
        self.auth.state.write().roles.insert(name, role.clone());
    }

    fn commit_auth_revision(&self, ctx: &mut WriteCtx) {
        let rev = self.auth.bump_revision();
        ctx.batch
            .put(Space::Meta, AUTH_REVISION, rev.to_be_bytes().to_vec());
    }

    /// Applies one auth operation (`raft_index` names simple tokens, as etcd's).
    pub(super) fn apply_auth(
        &self,
        op: &Op,
        raft_index: u64,
        ctx: &mut WriteCtx,
    ) -> Result<ApplyResponse> {
        let auth = &self.auth;
        let enabled = auth.is_enabled();
        let user = |name: &str| auth.user(name).ok_or(AuthError::UserNotFound);
        match op {
            Op::AuthEnable(_) => {
                if !enabled {
                    let root = auth.user(ROOT_USER).ok_or(AuthError::RootUserNotExist)?;
                    if !has_root_role(&root) {
                        return Err(AuthError::RootRoleNotExist.into());
                    }
                    ctx.batch.put(Space::Meta, AUTH_ENABLED, vec![1u8]);
                    auth.set_enabled(true);
                    tracing::info!("enabled authentication");
                }
            }
            Op::AuthDisable(_) => {
                if enabled {
                    ctx.batch.put(Space::Meta, AUTH_ENABLED, vec![0u8]);
                    self.commit_auth_revision(ctx);
                    auth.set_enabled(false);
                    tracing::info!("disabled authentication");
                }
            }
            Op::Authenticate(a) => {
                if !enabled {
                    return Err(AuthError::AuthNotEnabled.into());
                }
                let u = auth.user(&a.name).ok_or(AuthError::AuthFailed)?;
                if u.options.as_ref().is_some_and(|o| o.no_password) {
                    return Err(AuthError::AuthFailed.into());
                }
                let token = format!("{}.{}", a.simple_token, raft_index);
                auth.assign_token(token.clone(), a.name.clone());
                return Ok(ApplyResponse::Authenticated(token));
            }
            Op::AuthUserAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::UserEmpty.into());
                }
                if auth.user(&r.name).is_some() {
                    return Err(AuthError::UserAlreadyExist.into());
                }
                let options = r.options.unwrap_or(UserAddOptions { no_password: false });
                let password = if options.no_password {
                    Vec::new()
                } else {
                    hashed_password(&r.hashed_password)?
                };
                let new = User {
                    name: r.name.clone().into_bytes().into(),
                    password: password.into(),
                    roles: Vec::new(),
                    options: Some(options),
                };
                self.save_user(&new, ctx);
                self.commit_auth_revision(ctx);
                tracing::info!(user = %r.name, "added a user");
            }
            Op::AuthUserDelete(r) => {
                if enabled && r.name == ROOT_USER {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                user(&r.name)?;
                ctx.batch.delete(Space::Meta, user_key(&r.name));
                auth.state.write().users.remove(&r.name);
                self.commit_auth_revision(ctx);
                auth.invalidate_user(&r.name);
                tracing::info!(user = %r.name, "deleted a user");
            }
            Op::AuthUserChangePassword(r) => {
                let mut u = user(&r.name)?;
                if !u.options.as_ref().is_some_and(|o| o.no_password) {
                    u.password = hashed_password(&r.hashed_password)?.into();
                }
                self.save_user(&u, ctx);
                self.commit_auth_revision(ctx);
                auth.invalidate_user(&r.name);
                tracing::info!(user = %r.name, "changed a password of a user");
            }
            Op::AuthUserGrantRole(r) => {
                let mut u = user(&r.user)?;
                if r.role != ROOT_ROLE && auth.role(&r.role).is_none() {
                    return Err(AuthError::RoleNotFound.into());
                }
                if !u.roles.contains(&r.role) {
                    u.roles.push(r.role.clone());
                    u.roles.sort();
                    self.save_user(&u, ctx);
                    self.commit_auth_revision(ctx);
                }
            }
            Op::AuthUserRevokeRole(r) => {
                if enabled && r.name == ROOT_USER && r.role == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                let mut u = user(&r.name)?;
                let before = u.roles.len();
                u.roles.retain(|role| role != &r.role);
                if u.roles.len() == before {
                    return Err(AuthError::RoleNotGranted.into());
                }
                self.save_user(&u, ctx);
                self.commit_auth_revision(ctx);
            }
            Op::AuthRoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::RoleEmpty.into());
                }
                if auth.role(&r.name).is_some() {
                    return Err(AuthError::RoleAlreadyExist.into());
                }
                self.save_role(
                    &Role {
                        name: r.name.clone().into_bytes().into(),
                        key_permission: Vec::new(),
                    },
                    ctx,
                );
                self.commit_auth_revision(ctx);
            }
            Op::AuthRoleDelete(r) => {
                if enabled && r.role == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                auth.role(&r.role).ok_or(AuthError::RoleNotFound)?;
                ctx.batch.delete(Space::Meta, role_key(&r.role));
                auth.state.write().roles.remove(&r.role);
                let holders: Vec<User> = auth
                    .state
                    .read()
                    .users
                    .values()
                    .filter(|u| u.roles.contains(&r.role))
                    .cloned()
                    .collect();
                for mut u in holders {
                    u.roles.retain(|role| role != &r.role);
                    self.save_user(&u, ctx);
                }
                self.commit_auth_revision(ctx);
            }
            Op::AuthRoleGrantPermission(r) => {
                let perm = r.perm.as_ref().ok_or(AuthError::PermissionNotGiven)?;
                if !valid_permission_range(&perm.key, &perm.range_end) {
                    return Err(AuthError::InvalidAuthMgmt.into());
                }
                let mut role = auth.role(&r.name).ok_or(AuthError::RoleNotFound)?;
                match role
                    .key_permission
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(existing) => existing.perm_type = perm.perm_type,
                    None => {
                        role.key_permission.push(Permission {
                            perm_type: perm.perm_type,
                            key: perm.key.clone(),
                            range_end: perm.range_end.clone(),
                        });
                        role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                self.save_role(&role, ctx);
                self.commit_auth_revision(ctx);
            }
            Op::AuthRoleRevokePermission(r) => {
                let mut role = auth.role(&r.role).ok_or(AuthError::RoleNotFound)?;
                let before = role.key_permission.len();
                role.key_permission
                    .retain(|p| p.key != r.key || p.range_end != r.range_end);
                if role.key_permission.len() == before {
                    return Err(AuthError::PermissionNotGranted.into());
                }
                self.save_role(&role, ctx);
                self.commit_auth_revision(ctx);
            }
            _ => return Err(MvccError::Corrupt(0, "not an auth operation".into())),
        }
        Ok(ApplyResponse::Auth)
    }
}

/// The bcrypt hash the proposing member computed, base64 as etcd 3.5 carries it.
fn hashed_password(hashed: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(hashed)
        .map_err(|_| AuthError::NoPasswordUser.into())
}
