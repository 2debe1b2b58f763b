//! The auth store as replicated state: etcd's rules when changes are applied, the checks a
//! client's write gets when it is applied (including a token checked at an auth revision
//! that changed before the write was applied), tokens named by the raft index, and users
//! that survive a reopen and travel in snapshots.

mod support;

use metastore_memory::MemoryEngine;
use metastore_mvcc::auth::{AuthError, AuthInfo};
use metastore_mvcc::snapshot::{load_snapshot, write_snapshot};
use metastore_mvcc::{ApplyResponse, MvccError, Store};
use metastore_proto::authpb::{permission::Type, Permission};
use metastore_proto::etcdserverpb::*;
use metastore_proto::internal::{command::Op, AuthHeader, Authenticate, Command};
use std::sync::Arc;
use support::TestEngine;

fn cmd(op: Op) -> Command {
    Command {
        auth: None,
        op: Some(op),
    }
}

fn as_user(op: Op, user: &str, revision: u64) -> Command {
    Command {
        auth: Some(AuthHeader {
            username: user.into(),
            revision,
        }),
        op: Some(op),
    }
}

fn put(key: &str) -> Op {
    Op::Put(PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    })
}

fn user_add(name: &str) -> Op {
    Op::AuthUserAdd(AuthUserAddRequest {
        name: name.into(),
        // base64 of a bcrypt hash; never checked here.
        hashed_password: "JDJiJDEwJGFiYw==".into(),
        ..Default::default()
    })
}

/// Applies one command at `index`; its own result.
fn apply1(
    store: &Store<impl metastore_engine::Engine>,
    index: u64,
    c: Command,
) -> Result<ApplyResponse, MvccError> {
    let mut results = store
        .apply(index, &[c])
        .expect("entry applies")
        .expect("not applied before");
    results.remove(0)
}

fn setup(store: &Store<impl metastore_engine::Engine>) -> u64 {
    let ops = vec![
        user_add("root"),
        Op::AuthRoleAdd(AuthRoleAddRequest {
            name: "root".into(),
        }),
        Op::AuthUserGrantRole(AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        }),
        user_add("alice"),
        Op::AuthRoleAdd(AuthRoleAddRequest { name: "app".into() }),
        Op::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "app".into(),
            perm: Some(Permission {
                perm_type: Type::Readwrite as i32,
                key: b"app/".to_vec().into(),
                range_end: b"app0".to_vec().into(),
            }),
        }),
        Op::AuthUserGrantRole(AuthUserGrantRoleRequest {
            user: "alice".into(),
            role: "app".into(),
        }),
        Op::AuthEnable(AuthEnableRequest {}),
    ];
    let mut index = 0;
    for op in ops {
        index += 1;
        apply1(store, index, cmd(op)).expect("setup step");
    }
    index
}

fn auth_err(r: Result<ApplyResponse, MvccError>) -> AuthError {
    match r {
        Err(MvccError::Auth(e)) => e,
        other => panic!("expected an auth error, got {other:?}"),
    }
}

#[test]
fn etcds_rules_for_auth_changes() {
    let store = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    assert_eq!(
        store.auth().revision(),
        1,
        "a new auth store starts at revision 1"
    );
    let e = apply1(&store, 1, cmd(Op::AuthEnable(AuthEnableRequest {})));
    assert_eq!(auth_err(e), AuthError::RootUserNotExist);
    apply1(&store, 2, cmd(user_add("root"))).expect("root");
    let e = apply1(&store, 3, cmd(Op::AuthEnable(AuthEnableRequest {})));
    assert_eq!(auth_err(e), AuthError::RootRoleNotExist);
    assert_eq!(
        auth_err(apply1(&store, 4, cmd(user_add("root")))),
        AuthError::UserAlreadyExist
    );
    assert_eq!(
        auth_err(apply1(&store, 5, cmd(user_add("")))),
        AuthError::UserEmpty
    );
    let grant_missing = Op::AuthUserGrantRole(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "nosuch".into(),
    });
    assert_eq!(
        auth_err(apply1(&store, 6, cmd(grant_missing))),
        AuthError::RoleNotFound
    );
    // The root role needs no role record to be granted (etcd).
    let grant_root = Op::AuthUserGrantRole(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    });
    apply1(&store, 7, cmd(grant_root)).expect("root role");
    let revision = store.auth().revision();
    apply1(&store, 8, cmd(Op::AuthEnable(AuthEnableRequest {}))).expect("enable");
    assert!(store.auth().is_enabled());
    assert_eq!(
        store.auth().revision(),
        revision,
        "enabling keeps the revision (etcd)"
    );
    let delete_root = Op::AuthUserDelete(AuthUserDeleteRequest {
        name: "root".into(),
    });
    assert_eq!(
        auth_err(apply1(&store, 9, as_user(delete_root, "root", revision))),
        AuthError::InvalidAuthMgmt
    );
    let bad_range = Op::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
        name: "root".into(),
        perm: Some(Permission {
            perm_type: 0,
            key: b"b".to_vec().into(),
            range_end: b"a".to_vec().into(),
        }),
    });
    assert_eq!(
        auth_err(apply1(&store, 10, as_user(bad_range, "root", revision))),
        AuthError::InvalidAuthMgmt
    );
}

#[test]
fn a_write_checked_at_an_old_auth_revision_is_refused_when_applied() {
    let store = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    let mut index = setup(&store);
    let checked_at = store.auth().revision();
    index += 1;
    apply1(&store, index, as_user(put("app/1"), "alice", checked_at)).expect("permitted");
    index += 1;
    let e = apply1(&store, index, as_user(put("other"), "alice", checked_at));
    assert_eq!(auth_err(e), AuthError::PermissionDenied);
    index += 1;
    let e = apply1(&store, index, as_user(put("app/2"), "", 0));
    assert_eq!(auth_err(e), AuthError::UserEmpty);
    // An admin change lands between alice's check and her write's apply.
    index += 1;
    apply1(&store, index, as_user(user_add("bob"), "root", checked_at)).expect("bob");
    index += 1;
    let e = apply1(&store, index, as_user(put("app/3"), "alice", checked_at));
    assert_eq!(auth_err(e), AuthError::AuthOldRevision);
    // Non-root users cannot change the auth store.
    index += 1;
    let now = store.auth().revision();
    let e = apply1(&store, index, as_user(user_add("mallory"), "alice", now));
    assert_eq!(auth_err(e), AuthError::PermissionDenied);
    // The members' own commands (no header) are never checked.
    index += 1;
    apply1(&store, index, cmd(put("other"))).expect("internal");
    // A txn is checked op by op, compares included.
    let txn = TxnRequest {
        compare: vec![Compare {
            key: b"secret".to_vec().into(),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"app/4".to_vec().into(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    index += 1;
    let e = apply1(&store, index, as_user(Op::Txn(txn), "alice", now));
    assert_eq!(auth_err(e), AuthError::PermissionDenied);
    let info = AuthInfo {
        username: "alice".into(),
        revision: now,
    };
    assert!(store
        .auth()
        .check(&info, b"app/", b"app0", metastore_mvcc::auth::Need::Read)
        .is_ok());
    assert!(store
        .auth()
        .check(&info, b"app/", b"\0", metastore_mvcc::auth::Need::Read)
        .is_err());
}

#[test]
fn tokens_are_named_by_the_raft_index_and_die_with_their_user() {
    let store = Store::open(Arc::new(TestEngine::from_env())).expect("open");
    let index = setup(&store) + 1;
    let login = Op::Authenticate(Authenticate {
        name: "alice".into(),
        simple_token: "AbCdEfGhIjKlMnOp".into(),
    });
    let token = match apply1(&store, index, cmd(login)) {
        Ok(ApplyResponse::Authenticated(t)) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(token, format!("AbCdEfGhIjKlMnOp.{index}"));
    let info = store.auth().simple_token_info(&token).expect("known token");
    assert_eq!(info.username, "alice");
    let delete = Op::AuthUserDelete(AuthUserDeleteRequest {
        name: "alice".into(),
    });
    apply1(
        &store,
        index + 1,
        as_user(delete, "root", store.auth().revision()),
    )
    .expect("delete");
    assert!(store.auth().simple_token_info(&token).is_none());
}

#[test]
fn users_survive_a_reopen_and_travel_in_snapshots() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Store::open(engine.clone()).expect("open");
    let index = setup(&store);
    let revision = store.auth().revision();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_snapshot(engine.as_ref(), dir.path(), index, 1, 3).expect("snapshot");
    drop(store);
    let reopened = Store::open(engine).expect("reopen");
    assert!(reopened.auth().is_enabled());
    assert_eq!(reopened.auth().revision(), revision);
    let restored = Arc::new(MemoryEngine::new());
    load_snapshot(restored.as_ref(), &path).expect("load");
    let store = Store::open(restored).expect("open");
    assert!(store.auth().is_enabled());
    assert_eq!(store.auth().user_names(), ["alice", "root"]);
    assert_eq!(
        store.auth().role("app").expect("role").key_permission.len(),
        1
    );
    assert!(store.auth().has_role("alice", "app"));
}
