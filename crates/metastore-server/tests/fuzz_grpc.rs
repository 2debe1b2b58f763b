//! The client port's request decoders under arbitrary bytes: every unary etcd RPC (and the
//! Watch and LeaseKeepAlive streams) gets messages that are random, or valid requests with
//! bytes flipped, cut or appended (the seed corpus below). The server must answer each one
//! (an error is fine) within a bound, never crash, and keep serving.
//!
//! Cases are generated from a fixed seed so a failure reproduces; `METASTORE_FUZZ_CASES`
//! and `METASTORE_FUZZ_SEED` make a longer or different run.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::{Buf, BufMut, Bytes};
use common::TestServer;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::{authpb, v3electionpb, v3lockpb};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends and receives message bodies as they are, so any bytes reach the server's decoder.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Every unary RPC of the client port, with a valid request as its seed. Lock and Campaign
/// may wait for a holder legitimately; they are given leases that do not exist.
fn unary_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let kv = |k: &str| Bytes::copy_from_slice(k.as_bytes());
    let compare = pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Version as i32,
        key: kv("fuzz/a"),
        target_union: Some(pb::compare::TargetUnion::Version(0)),
        ..Default::default()
    };
    let put = pb::PutRequest {
        key: kv("fuzz/a"),
        value: kv("v"),
        ..Default::default()
    };
    let range = pb::RangeRequest {
        key: kv("fuzz/"),
        range_end: kv("fuzz0"),
        limit: 10,
        ..Default::default()
    };
    let txn = pb::TxnRequest {
        compare: vec![compare],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put.clone())),
        }],
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(range.clone())),
        }],
    };
    let perm = authpb::Permission {
        perm_type: authpb::permission::Type::Read as i32,
        key: kv("fuzz/"),
        range_end: kv("fuzz0"),
    };
    vec![
        ("/etcdserverpb.KV/Range", range.encode_to_vec()),
        ("/etcdserverpb.KV/Put", put.encode_to_vec()),
        (
            "/etcdserverpb.KV/DeleteRange",
            pb::DeleteRangeRequest {
                key: kv("fuzz/"),
                range_end: kv("fuzz0"),
                prev_kv: true,
            }
            .encode_to_vec(),
        ),
        ("/etcdserverpb.KV/Txn", txn.encode_to_vec()),
        (
            "/etcdserverpb.KV/Compact",
            pb::CompactionRequest {
                revision: 1,
                physical: false,
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Lease/LeaseGrant",
            pb::LeaseGrantRequest { ttl: 60, id: 0 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Lease/LeaseRevoke",
            pb::LeaseRevokeRequest { id: 7 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Lease/LeaseTimeToLive",
            pb::LeaseTimeToLiveRequest { id: 7, keys: true }.encode_to_vec(),
        ),
        ("/etcdserverpb.Lease/LeaseLeases", Vec::new()),
        (
            "/etcdserverpb.Cluster/MemberAdd",
            pb::MemberAddRequest {
                peer_ur_ls: vec!["http://127.0.0.1:1".into()],
                is_learner: true,
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Cluster/MemberRemove",
            pb::MemberRemoveRequest { id: 99 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Cluster/MemberUpdate",
            pb::MemberUpdateRequest {
                id: 99,
                peer_ur_ls: vec!["http://127.0.0.1:2".into()],
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Cluster/MemberList",
            pb::MemberListRequest { linearizable: true }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Cluster/MemberPromote",
            pb::MemberPromoteRequest { id: 99 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Maintenance/Alarm",
            pb::AlarmRequest::default().encode_to_vec(),
        ),
        ("/etcdserverpb.Maintenance/Status", Vec::new()),
        ("/etcdserverpb.Maintenance/Defragment", Vec::new()),
        ("/etcdserverpb.Maintenance/Hash", Vec::new()),
        (
            "/etcdserverpb.Maintenance/HashKV",
            pb::HashKvRequest { revision: 0 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Maintenance/MoveLeader",
            pb::MoveLeaderRequest { target_id: 99 }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Maintenance/Downgrade",
            pb::DowngradeRequest {
                action: 0,
                version: "3.4.0".into(),
            }
            .encode_to_vec(),
        ),
        ("/etcdserverpb.Auth/AuthStatus", Vec::new()),
        ("/etcdserverpb.Auth/AuthDisable", Vec::new()),
        ("/etcdserverpb.Auth/AuthEnable", Vec::new()),
        (
            "/etcdserverpb.Auth/Authenticate",
            pb::AuthenticateRequest {
                name: "fuzz".into(),
                password: "pw".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/UserAdd",
            pb::AuthUserAddRequest {
                name: "fuzz".into(),
                password: "pw".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/UserGet",
            pb::AuthUserGetRequest {
                name: "fuzz".into(),
            }
            .encode_to_vec(),
        ),
        ("/etcdserverpb.Auth/UserList", Vec::new()),
        (
            "/etcdserverpb.Auth/UserDelete",
            pb::AuthUserDeleteRequest {
                name: "fuzz".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/UserChangePassword",
            pb::AuthUserChangePasswordRequest {
                name: "fuzz".into(),
                password: "pw2".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/UserGrantRole",
            pb::AuthUserGrantRoleRequest {
                user: "fuzz".into(),
                role: "r".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/UserRevokeRole",
            pb::AuthUserRevokeRoleRequest {
                name: "fuzz".into(),
                role: "r".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/RoleAdd",
            pb::AuthRoleAddRequest { name: "r".into() }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/RoleGet",
            pb::AuthRoleGetRequest { role: "r".into() }.encode_to_vec(),
        ),
        ("/etcdserverpb.Auth/RoleList", Vec::new()),
        (
            "/etcdserverpb.Auth/RoleDelete",
            pb::AuthRoleDeleteRequest { role: "r".into() }.encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/RoleGrantPermission",
            pb::AuthRoleGrantPermissionRequest {
                name: "r".into(),
                perm: Some(perm),
            }
            .encode_to_vec(),
        ),
        (
            "/etcdserverpb.Auth/RoleRevokePermission",
            pb::AuthRoleRevokePermissionRequest {
                role: "r".into(),
                key: kv("fuzz/"),
                range_end: kv("fuzz0"),
            }
            .encode_to_vec(),
        ),
        (
            "/v3electionpb.Election/Campaign",
            v3electionpb::CampaignRequest {
                name: kv("fuzz-election"),
                lease: 424242,
                value: kv("me"),
            }
            .encode_to_vec(),
        ),
        (
            "/v3electionpb.Election/Leader",
            v3electionpb::LeaderRequest {
                name: kv("fuzz-election"),
            }
            .encode_to_vec(),
        ),
        (
            "/v3electionpb.Election/Resign",
            v3electionpb::ResignRequest::default().encode_to_vec(),
        ),
        (
            "/v3electionpb.Election/Proclaim",
            v3electionpb::ProclaimRequest::default().encode_to_vec(),
        ),
        (
            "/v3lockpb.Lock/Lock",
            v3lockpb::LockRequest {
                name: kv("fuzz-lock"),
                lease: 424242,
            }
            .encode_to_vec(),
        ),
        (
            "/v3lockpb.Lock/Unlock",
            v3lockpb::UnlockRequest {
                key: kv("fuzz-lock/1"),
            }
            .encode_to_vec(),
        ),
    ]
}

fn stream_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: Bytes::from_static(b"fuzz/"),
                range_end: Bytes::from_static(b"fuzz0"),
                start_revision: 1,
                prev_kv: true,
                progress_notify: true,
                ..Default::default()
            },
        )),
    };
    vec![
        ("/etcdserverpb.Watch/Watch", create.encode_to_vec()),
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            pb::LeaseKeepAliveRequest { id: 7 }.encode_to_vec(),
        ),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Cut {
        at: usize,
    },
    Append(Vec<u8>),
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A well-formed field appended: the message still decodes, with a value of any kind
    /// in any field (a later field of the same number replaces the seed's).
    Field {
        number: u32,
        value: FieldValue,
    },
}

#[derive(Debug, Clone)]
enum FieldValue {
    Varint(u64),
    Bytes(Vec<u8>),
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for m in mutations {
        match m {
            Mutation::Flip { at, xor } if !out.is_empty() => {
                let i = at % out.len();
                out[i] ^= xor;
            }
            Mutation::Cut { at } if !out.is_empty() => out.truncate(at % out.len()),
            Mutation::Append(bytes) => out.extend_from_slice(bytes),
            Mutation::Insert { at, bytes } => {
                let i = at % (out.len() + 1);
                out.splice(i..i, bytes.iter().copied());
            }
            Mutation::Field { number, value } => match value {
                FieldValue::Varint(v) => {
                    prost::encoding::encode_key(
                        *number,
                        prost::encoding::WireType::Varint,
                        &mut out,
                    );
                    prost::encoding::encode_varint(*v, &mut out);
                }
                FieldValue::Bytes(b) => {
                    prost::encoding::bytes::encode(*number, b, &mut out);
                }
            },
            _ => {}
        }
    }
    out
}

/// A message: random bytes, or a seed mutated.
fn message(seed_count: usize) -> impl Strategy<Value = (usize, Option<Vec<u8>>, Vec<Mutation>)> {
    let value = prop_oneof![
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(i64::MAX as u64),
            any::<u64>()
        ]
        .prop_map(FieldValue::Varint),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(FieldValue::Bytes),
    ];
    let mutation = prop_oneof![
        1 => (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        1 => any::<usize>().prop_map(|at| Mutation::Cut { at }),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        6 => (1u32..12, value).prop_map(|(number, value)| Mutation::Field { number, value }),
    ];
    (
        0..seed_count,
        prop::option::weighted(0.15, prop::collection::vec(any::<u8>(), 0..200)),
        prop::collection::vec(mutation, 1..4),
    )
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_request_bytes_get_answers_and_never_crash_the_server() {
    let cases = env_or("METASTORE_FUZZ_CASES", 600);
    let seed = env_or("METASTORE_FUZZ_SEED", 20261207);
    // Cheap bcrypt: a random UserAdd or password change must not cost a second each.
    let srv = TestServer::start_with_args(&["--bcrypt-cost", "4"]).await;
    let channel = Channel::from_shared(srv.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let unary = unary_seeds();
    let streams = stream_seeds();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = message(unary.len() + streams.len());
    let mut answered = 0u64;
    let mut refused = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..cases {
        let (which, random, mutations) = strategy.new_tree(&mut runner).unwrap().current();
        let (path, seed_msg, is_stream) = if which < unary.len() {
            (unary[which].0, &unary[which].1, false)
        } else {
            let s = &streams[which - unary.len()];
            (s.0, &s.1, true)
        };
        let body = random.unwrap_or_else(|| mutate(seed_msg, &mutations));
        let what = format!("case {case}: {path} with {} bytes {body:02x?}", body.len());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let answer = if is_stream {
            let requests = futures::stream::iter(vec![Bytes::from(body.clone()); 2]);
            let call = grpc.streaming(tonic::Request::new(requests), path, RawCodec);
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Err(_) => panic!("{what}: no answer within 10 s"),
                Ok(Ok(resp)) => {
                    // Take what comes within a moment; a watch may stay open.
                    let mut inbound = resp.into_inner();
                    let _ =
                        tokio::time::timeout(Duration::from_millis(50), inbound.message()).await;
                    Ok(())
                }
                Ok(Err(status)) => Err(status),
            }
        } else {
            let call = grpc.unary(
                tonic::Request::new(Bytes::from(body.clone())),
                path,
                RawCodec,
            );
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Err(_) if path_waits(path_str(&what)) => Ok(()),
                Err(_) => panic!("{what}: no answer within 10 s"),
                Ok(r) => r.map(|_| ()),
            }
        };
        match answer {
            Ok(()) => answered += 1,
            Err(status) => {
                // A refusal is an answer; a broken connection would mean the server died.
                assert!(
                    !matches!(status.code(), tonic::Code::Unknown)
                        || !status.message().contains("transport"),
                    "{what}: {status:?}"
                );
                let n = refused.entry(format!("{:?}", status.code())).or_default();
                *n += 1;
                if *n <= 3 && std::env::var_os("METASTORE_FUZZ_VERBOSE").is_some() {
                    eprintln!("{what}: {:?} {}", status.code(), status.message());
                }
            }
        }
        if case % 100 == 99 {
            assert_serving(&srv, &what).await;
        }
    }
    eprintln!("{cases} cases: {answered} answered, refused by code: {refused:?}");
    // Most mutated seeds still decode: the handlers ran, not only the decoder.
    let ran: u64 = refused
        .iter()
        .filter(|(code, _)| code.as_str() != "Internal")
        .map(|(_, n)| n)
        .sum::<u64>()
        + answered;
    assert!(
        ran > cases / 3,
        "only {ran} of {cases} requests reached a handler"
    );
    assert_serving(&srv, "the end").await;
    // The whole log: a panic early in the run must not scroll out of a tail.
    let logs = srv.logs();
    if let Some(at) = logs.find("panicked") {
        let end = (at + 2000).min(logs.len());
        panic!("the server panicked:\n{}", &logs[at..end]);
    }
}

fn path_str(what: &str) -> &str {
    what.split(' ').nth(2).unwrap_or("")
}

/// RPCs that may wait for a holder or a leader legitimately.
fn path_waits(path: &str) -> bool {
    path.ends_with("/Lock") || path.ends_with("/Campaign")
}

async fn assert_serving(srv: &TestServer, after: &str) {
    let mut client = srv.client().await;
    let status = tokio::time::timeout(Duration::from_secs(10), client.status()).await;
    assert!(
        matches!(status, Ok(Ok(_))),
        "the server stopped serving after {after}: {status:?}"
    );
}
