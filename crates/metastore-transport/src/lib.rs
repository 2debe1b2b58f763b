//! The peer transport: raft messages between members over one gRPC stream per peer.
//!
//! [`PeerTransport`] implements `metastore_raft::Transport` for the sending side; [`PeerService`]
//! is the receiving side, served on the member's peer port. See the README for the design.

mod receive;
mod send;
mod snapshot;

pub use metastore_proto::metastore::peer::{MembersResponse, PeerMember};
pub use receive::{fetch_members, MembersSource, PeerService, RemovedSource};
pub use send::PeerTransport;

/// What each peer announced on its stream, by member id: its version (the leader needs it to
/// decide the cluster version), whether it is a witness, and how far its state machine is
/// durable (a witness trims its log by it). Cheap to clone.
#[derive(Clone, Default)]
pub struct PeerVersions(
    std::sync::Arc<parking_lot::RwLock<std::collections::HashMap<u64, Announced>>>,
);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Announced {
    version: String,
    witness: bool,
    durable_index: u64,
    data_durable_index: u64,
}

impl PeerVersions {
    pub fn get(&self, member: u64) -> Option<String> {
        self.0
            .read()
            .get(&member)
            .map(|a| a.version.clone())
            .filter(|v| !v.is_empty())
    }

    /// Whether `member` announced itself a witness.
    pub fn is_witness(&self, member: u64) -> bool {
        self.0.read().get(&member).is_some_and(|a| a.witness)
    }

    /// The durable index `member` last announced; None if it never did.
    pub fn durable_index(&self, member: u64) -> Option<u64> {
        self.0.read().get(&member).map(|a| a.durable_index)
    }

    /// Only the version (a snapshot stream announces nothing else).
    fn record_version(&self, member: u64, version: &str) {
        if version.is_empty() || self.get(member).is_some_and(|v| v == version) {
            return;
        }
        self.0.write().entry(member).or_default().version = version.to_string();
    }

    /// The lowest durable index of the data members, as a leader announced it; None until one
    /// has.
    pub fn data_durable_index(&self) -> Option<u64> {
        self.0
            .read()
            .values()
            .map(|a| a.data_durable_index)
            .filter(|&d| d > 0)
            .max()
    }

    fn record(
        &self,
        member: u64,
        version: &str,
        witness: bool,
        durable_index: u64,
        data_durable_index: u64,
    ) {
        let announced = Announced {
            version: version.to_string(),
            witness,
            durable_index,
            data_durable_index,
        };
        if self.0.read().get(&member) == Some(&announced) {
            return;
        }
        self.0.write().insert(member, announced);
    }
}

/// This build's version, announced to peers.
const VERSION: &str = env!("CARGO_PKG_VERSION");

use bytes::{BufMut, Bytes, BytesMut};
use metastore_raft::eraftpb::{Message, MessageType};
use protobuf::Message as _;
use std::time::Duration;

/// etcd's text for a peer of another cluster; clients and operators know it.
pub const CLUSTER_ID_MISMATCH: &str = "etcdserver: cluster ID mismatch";

/// What a member answers a peer removed from the cluster.
pub const MEMBER_REMOVED: &str = "the member has been permanently removed from the cluster";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer {0}: invalid URL {1:?}: {2}")]
    Url(u64, String, String),
    #[error("undecodable raft message: {0}")]
    Decode(String),
    #[error("asking {0} for the cluster's members: {1}")]
    Members(String, String),
}

/// How a member connects to a peer URL. The server supplies one that speaks TLS to
/// `https://` peers; the default dials plain HTTP/2.
pub trait PeerDialer: Send + Sync + 'static {
    fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tonic::transport::Channel, tonic::transport::Error>,
                > + Send,
        >,
    >;
}

struct PlainDialer;

impl PeerDialer for PlainDialer {
    fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tonic::transport::Channel, tonic::transport::Error>,
                > + Send,
        >,
    > {
        Box::pin(async move { endpoint.connect().await })
    }
}

/// The dialer a transport uses (cloned into every sender).
#[derive(Clone)]
pub struct Dialer(pub std::sync::Arc<dyn PeerDialer>);

impl Default for Dialer {
    fn default() -> Self {
        Self(std::sync::Arc::new(PlainDialer))
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}

/// Queue and batch sizes; the defaults suit the raft config's 4 MiB messages and 512 in flight.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Control messages (heartbeats, votes, ReadIndex, append responses) queued per peer.
    pub control_queue: usize,
    /// Appends (and snapshots) queued per peer: raft's `max-inflight-msgs` and a margin.
    pub data_queue: usize,
    /// Most messages in one batch on the stream.
    pub max_batch_messages: usize,
    /// Most bytes in one batch on the stream (messages are never split).
    pub max_batch_bytes: usize,
    /// Messages at least this large travel snappy-compressed, when that makes them smaller.
    pub compress_above: usize,
    pub connect_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// This member is a witness; its peers are told so.
    pub witness: bool,
    /// How peers are reached (plain or TLS).
    pub dialer: Dialer,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            control_queue: 1024,
            data_queue: 1024,
            max_batch_messages: 128,
            max_batch_bytes: 4 * 1024 * 1024,
            compress_above: 64 * 1024,
            connect_timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            witness: false,
            dialer: Dialer::default(),
        }
    }
}

/// Small messages that keep the cluster alive and answer reads: they never wait behind appends.
fn is_control(msg: &Message) -> bool {
    !matches!(
        msg.get_msg_type(),
        MessageType::MsgAppend | MessageType::MsgSnapshot | MessageType::MsgPropose
    )
}

const PLAIN: u8 = 0;
const SNAPPY: u8 = 1;

/// A raft message as it travels: one header byte, then the protobuf, snappy-compressed when
/// it is large and compression pays.
fn encode_message(msg: &Message, compress_above: usize) -> Option<Bytes> {
    let raw = match msg.write_to_bytes() {
        Ok(raw) => raw,
        Err(e) => {
            // Only a message raft-rs built itself gets here; it always encodes.
            tracing::error!(error = %e, "cannot encode a raft message; dropping it");
            return None;
        }
    };
    if raw.len() >= compress_above {
        if let Ok(packed) = snap::raw::Encoder::new().compress_vec(&raw) {
            if packed.len() < raw.len() {
                let mut out = BytesMut::with_capacity(packed.len() + 1);
                out.put_u8(SNAPPY);
                out.extend_from_slice(&packed);
                return Some(out.freeze());
            }
        }
    }
    let mut out = BytesMut::with_capacity(raw.len() + 1);
    out.put_u8(PLAIN);
    out.extend_from_slice(&raw);
    Some(out.freeze())
}

fn decode_message(frame: &[u8]) -> Result<Message, TransportError> {
    let (&head, body) = frame
        .split_first()
        .ok_or_else(|| TransportError::Decode("empty message".into()))?;
    let unpacked;
    let raw = match head {
        PLAIN => body,
        SNAPPY => {
            unpacked = snap::raw::Decoder::new()
                .decompress_vec(body)
                .map_err(|e| TransportError::Decode(format!("snappy: {e}")))?;
            &unpacked[..]
        }
        other => {
            return Err(TransportError::Decode(format!(
                "unknown compression code {other}"
            )))
        }
    };
    let mut msg = Message::default();
    msg.merge_from_bytes(raw)
        .map_err(|e| TransportError::Decode(e.to_string()))?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_raft::eraftpb::Entry;

    fn append(len: usize) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgAppend);
        msg.to = 2;
        msg.from = 1;
        msg.mut_entries().push(Entry {
            data: vec![7u8; len].into(),
            ..Default::default()
        });
        msg
    }

    #[test]
    fn messages_round_trip_plain_and_compressed() {
        for len in [0, 10, 200_000] {
            let msg = append(len);
            let frame = encode_message(&msg, 64 * 1024).expect("encode");
            assert_eq!(frame[0], if len >= 64 * 1024 { SNAPPY } else { PLAIN });
            assert!(frame.len() < len.max(64) + 64);
            assert_eq!(decode_message(&frame).expect("decode"), msg);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for frame in [
            &b""[..],
            &[9, 1, 2][..],
            &[SNAPPY, 0xff, 0xff][..],
            &[PLAIN, 0xff][..],
        ] {
            assert!(decode_message(frame).is_err(), "{frame:?}");
        }
    }

    #[test]
    fn heartbeats_and_votes_are_control_appends_are_not() {
        let mut m = Message::default();
        for (t, control) in [
            (MessageType::MsgHeartbeat, true),
            (MessageType::MsgRequestVote, true),
            (MessageType::MsgRequestPreVote, true),
            (MessageType::MsgReadIndex, true),
            (MessageType::MsgAppendResponse, true),
            (MessageType::MsgAppend, false),
            (MessageType::MsgSnapshot, false),
        ] {
            m.set_msg_type(t);
            assert_eq!(is_control(&m), control, "{t:?}");
        }
    }
}
