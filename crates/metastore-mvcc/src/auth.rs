//! etcd's auth store as the state machine keeps it: users (bcrypt hash, roles, `no_password`),
//! roles with key-range permissions, whether auth is on, and the auth revision that rises
//! with every user or role change. It is replicated state: changed only by applied commands,
//! persisted in the engine's meta space (the layout `snapshot::etcd_import` documents, so a
//! restore from etcd brings users over and a snapshot carries them to etcd and to followers).
//!
//! Also here, because the apply loop assigns them: the simple tokens this member knows
//! (etcd's `tokenSimple`), which are not persisted (a restart forgets them, as etcd's).
//!
//! The permission rules are etcd's (`server/auth/store.go`, `range_perm_cache.go`): a request
//! on one key needs a permission interval holding that key; a range needs the union of the
//! user's intervals to cover all of it; the `root` role may do anything.

use crate::snapshot::{AUTH_ENABLED, AUTH_REVISION, AUTH_ROLE_PREFIX, AUTH_USER_PREFIX};
use crate::MvccError;
use metastore_engine::{Engine, Space};
use metastore_proto::authpb::{permission::Type as PermType, Permission, Role, User};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

/// etcd's auth errors (`server/auth/store.go`); the API maps each to its gRPC code and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("auth: root user does not exist")]
    RootUserNotExist,
    #[error("auth: root user does not have root role")]
    RootRoleNotExist,
    #[error("auth: user already exists")]
    UserAlreadyExist,
    #[error("auth: user name is empty")]
    UserEmpty,
    #[error("auth: user not found")]
    UserNotFound,
    #[error("auth: role already exists")]
    RoleAlreadyExist,
    #[error("auth: role not found")]
    RoleNotFound,
    #[error("auth: role name is empty")]
    RoleEmpty,
    #[error("auth: permission not given")]
    PermissionNotGiven,
    #[error("auth: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    #[error("auth: permission denied")]
    PermissionDenied,
    #[error("auth: role is not granted to the user")]
    RoleNotGranted,
    #[error("auth: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("auth: authentication is not enabled")]
    AuthNotEnabled,
    #[error("auth: revision in header is old")]
    AuthOldRevision,
    #[error("auth: invalid auth token")]
    InvalidAuthToken,
    #[error("auth: invalid auth management")]
    InvalidAuthMgmt,
}

/// Who a request runs as (etcd's `AuthInfo`): revision 0 means nobody (no token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

/// READ or WRITE, as a request needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
}

/// Users and roles as of the last applied change.
#[derive(Default, Clone)]
pub(crate) struct AuthState {
    pub(crate) users: BTreeMap<String, User>,
    pub(crate) roles: BTreeMap<String, Role>,
}

/// An interval of keys `[start, end)`; `end` None is unbounded.
type Interval = (Vec<u8>, Option<Vec<u8>>);

pub struct AuthStore {
    enabled: AtomicBool,
    revision: AtomicU64,
    pub(crate) state: RwLock<AuthState>,
    tokens: Mutex<HashMap<String, SimpleToken>>,
    token_ttl: RwLock<Duration>,
}

struct SimpleToken {
    username: String,
    last_used: Instant,
}

/// etcd's default simple-token TTL (`--auth-token-ttl`).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

impl Default for AuthStore {
    fn default() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            revision: AtomicU64::new(1),
            state: RwLock::default(),
            tokens: Mutex::default(),
            token_ttl: RwLock::new(DEFAULT_TOKEN_TTL),
        }
    }
}

fn scan_prefix<T: Message + Default>(
    engine: &dyn Engine,
    prefix: &[u8],
) -> Result<Vec<T>, MvccError> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    let mut out = Vec::new();
    let mut err = None;
    engine.scan(
        Space::Meta,
        (Bound::Included(prefix), Bound::Excluded(&end[..])),
        &mut |k, v| match T::decode(v.clone()) {
            Ok(t) => {
                out.push(t);
                true
            }
            Err(e) => {
                err = Some(MvccError::Corrupt(0, format!("auth record {k:?}: {e}")));
                false
            }
        },
    )?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

pub(crate) fn user_key(name: &str) -> Vec<u8> {
    [AUTH_USER_PREFIX, name.as_bytes()].concat()
}

pub(crate) fn role_key(name: &str) -> Vec<u8> {
    [AUTH_ROLE_PREFIX, name.as_bytes()].concat()
}

impl AuthStore {
    /// Reads the auth state from the engine's meta space (at open, after a snapshot install).
    pub(crate) fn reload(&self, engine: &dyn Engine) -> Result<(), MvccError> {
        let users = scan_prefix::<User>(engine, AUTH_USER_PREFIX)?
            .into_iter()
            .map(|u| (String::from_utf8_lossy(&u.name).into_owned(), u))
            .collect();
        let roles = scan_prefix::<Role>(engine, AUTH_ROLE_PREFIX)?
            .into_iter()
            .map(|r| (String::from_utf8_lossy(&r.name).into_owned(), r))
            .collect();
        let enabled = engine
            .get(Space::Meta, AUTH_ENABLED)?
            .is_some_and(|v| v.first() == Some(&1));
        // etcd starts a new auth store at revision 1.
        let revision = match engine.get(Space::Meta, AUTH_REVISION)? {
            Some(v) => u64::from_be_bytes(v[..].try_into().map_err(|_| {
                MvccError::Corrupt(0, format!("auth revision has {} bytes", v.len()))
            })?)
            .max(1),
            None => 1,
        };
        *self.state.write() = AuthState { users, roles };
        self.revision.store(revision, Ordering::Release);
        let was = self.enabled.swap(enabled, Ordering::AcqRel);
        if was != enabled || !enabled {
            self.tokens.lock().clear();
        }
        Ok(())
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        // etcd's tokenProvider.disable(): every simple token is dropped.
        self.tokens.lock().clear();
    }

    /// Raises the revision (etcd's `commitRevision`) and returns the new one.
    pub(crate) fn bump_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn set_token_ttl(&self, ttl: Duration) {
        *self.token_ttl.write() = ttl;
    }

    pub fn user(&self, name: &str) -> Option<User> {
        self.state.read().users.get(name).cloned()
    }

    pub fn role(&self, name: &str) -> Option<Role> {
        self.state.read().roles.get(name).cloned()
    }

    pub fn user_names(&self) -> Vec<String> {
        self.state.read().users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.state.read().roles.keys().cloned().collect()
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.state
            .read()
            .users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    // ---- tokens ----------------------------------------------------------------------------

    /// Remembers a simple token for `username` (applied `Authenticate`).
    pub(crate) fn assign_token(&self, token: String, username: String) {
        let ttl = *self.token_ttl.read();
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, t| now.duration_since(t.last_used) < ttl);
        tokens.insert(
            token,
            SimpleToken {
                username,
                last_used: now,
            },
        );
    }

    /// Drops every token of a user (deleted, or its password changed).
    pub(crate) fn invalidate_user(&self, username: &str) {
        self.tokens.lock().retain(|_, t| t.username != username);
    }

    /// The user a simple token stands for, at the current auth revision (as etcd: a simple
    /// token follows permission changes instead of going stale). Each use restarts its TTL.
    pub fn simple_token_info(&self, token: &str) -> Option<AuthInfo> {
        let ttl = *self.token_ttl.read();
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        let entry = tokens.get_mut(token)?;
        if now.duration_since(entry.last_used) >= ttl {
            tokens.remove(token);
            return None;
        }
        entry.last_used = now;
        Some(AuthInfo {
            username: entry.username.clone(),
            revision: self.revision(),
        })
    }

    // ---- permission checks -------------------------------------------------------------------

    /// etcd's `IsAdminPermitted`: anything goes while auth is off; else the user must hold the
    /// root role.
    pub fn check_admin(&self, info: Option<&AuthInfo>) -> Result<(), AuthError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let Some(info) = info.filter(|i| !i.username.is_empty()) else {
            return Err(AuthError::UserEmpty);
        };
        match self.state.read().users.get(&info.username) {
            None => Err(AuthError::UserNotFound),
            Some(u) if has_root_role(u) => Ok(()),
            Some(_) => Err(AuthError::PermissionDenied),
        }
    }

    /// etcd's `isOpPermitted`: `range_end` empty is the single key `key`; `\0` is every key
    /// from `key` on.
    pub fn check(
        &self,
        info: &AuthInfo,
        key: &[u8],
        range_end: &[u8],
        need: Need,
    ) -> Result<(), AuthError> {
        if !self.is_enabled() {
            return Ok(());
        }
        if info.revision == 0 {
            return Err(AuthError::UserEmpty);
        }
        if info.revision < self.revision() {
            return Err(AuthError::AuthOldRevision);
        }
        let state = self.state.read();
        let Some(user) = state.users.get(&info.username) else {
            return Err(AuthError::PermissionDenied);
        };
        if has_root_role(user) {
            return Ok(());
        }
        let intervals = granted_intervals(&state, user, need);
        let permitted = if range_end.is_empty() {
            intervals
                .iter()
                .any(|(s, e)| s.as_slice() <= key && e.as_ref().is_none_or(|e| key < e.as_slice()))
        } else {
            let end = (range_end != [0]).then_some(range_end);
            covers(intervals, key, end)
        };
        if permitted {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }
}

pub(crate) fn has_root_role(user: &User) -> bool {
    user.roles.iter().any(|r| r == ROOT_ROLE)
}

/// The intervals the user's roles grant for `need` (etcd's `getMergedPerms`).
fn granted_intervals(state: &AuthState, user: &User, need: Need) -> Vec<Interval> {
    let mut out = Vec::new();
    for role in user.roles.iter().filter_map(|r| state.roles.get(r)) {
        for perm in &role.key_permission {
            let grants = match PermType::try_from(perm.perm_type) {
                Ok(PermType::Readwrite) => true,
                Ok(PermType::Read) => need == Need::Read,
                Ok(PermType::Write) => need == Need::Write,
                Err(_) => false,
            };
            if grants {
                out.push(permission_interval(perm));
            }
        }
    }
    out
}

/// A permission as an interval: no range end is the one key, `\0` is open-ended.
fn permission_interval(perm: &Permission) -> Interval {
    let key = perm.key.to_vec();
    if perm.range_end.is_empty() {
        let mut end = key.clone();
        end.push(0);
        (key, Some(end))
    } else if perm.range_end[..] == [0] {
        (key, None)
    } else {
        (key, Some(perm.range_end.to_vec()))
    }
}

/// Whether the union of `intervals` covers `[start, end)` (end None: unbounded).
fn covers(mut intervals: Vec<Interval>, start: &[u8], end: Option<&[u8]>) -> bool {
    intervals.sort_by(|a, b| a.0.cmp(&b.0));
    let mut reached = start.to_vec();
    for (s, e) in intervals {
        if s.as_slice() > reached.as_slice() {
            break;
        }
        match e {
            None => return true,
            Some(e) if e > reached => reached = e,
            Some(_) => {}
        }
        if end.is_some_and(|end| reached.as_slice() >= end) {
            return true;
        }
    }
    false
}

/// etcd's `isValidPermissionRange`: a key is required; a range end must lie after it or be
/// `\0` (open-ended).
pub(crate) fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(s: &str, e: Option<&str>) -> Interval {
        (s.as_bytes().to_vec(), e.map(|e| e.as_bytes().to_vec()))
    }

    #[test]
    fn union_of_intervals_must_cover_the_whole_range() {
        let ivs = vec![iv("a", Some("c")), iv("c", Some("e"))];
        assert!(covers(ivs.clone(), b"a", Some(b"e")));
        assert!(covers(ivs.clone(), b"b", Some(b"d")));
        assert!(!covers(ivs.clone(), b"a", Some(b"f")));
        assert!(!covers(ivs.clone(), b"a", None));
        let gap = vec![iv("a", Some("b")), iv("c", Some("e"))];
        assert!(!covers(gap, b"a", Some(b"d")));
        assert!(covers(vec![iv("a", None)], b"b", None));
    }

    #[test]
    fn permission_ranges_as_etcd_validates_them() {
        assert!(valid_permission_range(b"a", b""));
        assert!(valid_permission_range(b"a", b"b"));
        assert!(valid_permission_range(b"a", b"\0"));
        assert!(!valid_permission_range(b"b", b"a"));
        assert!(!valid_permission_range(b"", b"b"));
    }
}
