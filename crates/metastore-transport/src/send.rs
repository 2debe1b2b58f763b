//! The sending side: a bounded queue pair and a sender task per peer.

use crate::{encode_message, is_control, TransportConfig, TransportError, CLUSTER_ID_MISMATCH};
use metastore_proto::metastore::peer::raft_peer_client::RaftPeerClient;
use metastore_proto::metastore::peer::MessageBatch;
use metastore_raft::eraftpb::{Message, MessageType};
use metastore_raft::{PeerFeedback, Transport};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc::{self, error::TrySendError};
use tonic::transport::{Channel, Endpoint};

struct PeerQueues {
    control: mpsc::Sender<Message>,
    data: mpsc::Sender<Message>,
    /// Where the peer is reached; snapshots go there on a connection of their own.
    url: String,
    /// Since when the stream to the peer has been up (None: not connected).
    active_since: Arc<parking_lot::Mutex<Option<Instant>>>,
}

/// Raft messages to every peer. `send` runs on the raft thread and never blocks it. The peers
/// follow the member table ([`PeerTransport::set_peers`]).
pub struct PeerTransport {
    peers: parking_lot::RwLock<HashMap<u64, PeerQueues>>,
    feedback: Arc<OnceLock<PeerFeedback>>,
    /// This member's durable index, announced on every batch.
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// On the leader: the data members' lowest durable index, announced for a witness.
    data_durable: Arc<std::sync::atomic::AtomicU64>,
    local_id: u64,
    cluster_id: u64,
    config: TransportConfig,
    runtime: tokio::runtime::Handle,
}

/// What one sender task knows.
struct Peer {
    id: u64,
    url: String,
    from: u64,
    cluster_id: u64,
    config: TransportConfig,
    feedback: Arc<OnceLock<PeerFeedback>>,
    active_since: Arc<parking_lot::Mutex<Option<Instant>>>,
    durable: Arc<std::sync::atomic::AtomicU64>,
    data_durable: Arc<std::sync::atomic::AtomicU64>,
}

impl Peer {
    fn unreachable(&self) {
        metrics::counter!("etcd_network_peer_sent_failures_total", "To" => format!("{:x}", self.id))
            .increment(1);
        if let Some(f) = self.feedback.get() {
            f.unreachable(self.id);
        }
    }
}

impl PeerTransport {
    /// Starts one sender task per peer (`id → peer URL`, this member excluded) on the current
    /// tokio runtime.
    pub fn new(
        local_id: u64,
        cluster_id: u64,
        peers: HashMap<u64, String>,
        config: TransportConfig,
    ) -> Result<Self, TransportError> {
        let transport = Self {
            peers: Default::default(),
            feedback: Arc::new(OnceLock::new()),
            durable: Arc::default(),
            data_durable: Arc::default(),
            local_id,
            cluster_id,
            config,
            runtime: tokio::runtime::Handle::current(),
        };
        transport.set_peers(peers)?;
        Ok(transport)
    }

    /// Makes the peers exactly these (`id → peer URL`; this member is skipped): a new one
    /// gets a sender task, a gone one's task ends, a moved one is reconnected at its new URL.
    /// A URL that does not parse is an error and changes nothing.
    pub fn set_peers(&self, peers: HashMap<u64, String>) -> Result<(), TransportError> {
        for (id, url) in &peers {
            Endpoint::from_shared(url.clone())
                .map_err(|e| TransportError::Url(*id, url.clone(), e.to_string()))?;
        }
        let mut current = self.peers.write();
        current.retain(|id, q| peers.get(id) == Some(&q.url));
        for (id, url) in peers {
            if id == self.local_id || current.contains_key(&id) {
                continue;
            }
            let (control, control_rx) = mpsc::channel(self.config.control_queue.max(1));
            let (data, data_rx) = mpsc::channel(self.config.data_queue.max(1));
            let active_since = Arc::new(parking_lot::Mutex::new(None));
            let peer = Peer {
                id,
                url: url.clone(),
                from: self.local_id,
                cluster_id: self.cluster_id,
                config: self.config.clone(),
                feedback: self.feedback.clone(),
                active_since: active_since.clone(),
                durable: self.durable.clone(),
                data_durable: self.data_durable.clone(),
            };
            tracing::info!(peer = format_args!("{id:x}"), %url, "added a peer");
            self.runtime.spawn(run_peer(peer, control_rx, data_rx));
            current.insert(
                id,
                PeerQueues {
                    control,
                    data,
                    url,
                    active_since,
                },
            );
        }
        Ok(())
    }

    /// Where this member's durable state-machine index is kept up to date, for announcing it
    /// to peers (a witness trims its log by the data members' lowest).
    pub fn durable_index_cell(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.durable.clone()
    }

    /// Where the leader keeps the data members' lowest durable index, announced to peers.
    pub fn data_durable_index_cell(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.data_durable.clone()
    }

    /// Since when the stream to `peer` has been up; None while it is not (etcd's
    /// `ActiveSince`, which its reconfiguration checks use).
    pub fn active_since(&self, peer: u64) -> Option<Instant> {
        self.peers
            .read()
            .get(&peer)
            .and_then(|q| *q.active_since.lock())
    }
}

impl PeerTransport {
    /// raft-rs sends one snapshot to a follower at a time and waits for `snapshot_sent`.
    fn send_snapshot(&self, msg: Message, url: String) {
        let Some(feedback) = self.feedback.get() else {
            return;
        };
        let target = crate::snapshot::SnapshotSend {
            url,
            cluster_id: self.cluster_id,
            from: self.local_id,
            config: self.config.clone(),
        };
        self.runtime.spawn(crate::snapshot::send_snapshot(
            target,
            msg,
            feedback.clone(),
        ));
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.read();
        for msg in msgs {
            let to = msg.to;
            let Some(queues) = peers.get(&to) else {
                // A member just added, before the member table names its URL: raft probes it
                // again once it is reachable.
                tracing::debug!(to, "raft message to an unknown member dropped");
                if let Some(f) = self.feedback.get() {
                    if msg.get_msg_type() == MessageType::MsgSnapshot {
                        f.snapshot_sent(to, false);
                    } else {
                        f.unreachable(to);
                    }
                }
                continue;
            };
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(msg, queues.url.clone());
                continue;
            }
            let queue = if is_control(&msg) {
                &queues.control
            } else {
                &queues.data
            };
            match queue.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                    if let Some(f) = self.feedback.get() {
                        f.unreachable(to);
                    }
                }
            }
        }
    }

    fn bind(&self, feedback: PeerFeedback) {
        let _ = self.feedback.set(feedback);
    }
}

async fn connect(peer: &Peer) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(peer.url.clone())?
        .connect_timeout(peer.config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true);
    peer.config.dialer.0.connect(endpoint).await
}

/// Drops whatever is queued while the peer cannot be reached; true if anything was.
fn drain(control: &mut mpsc::Receiver<Message>, data: &mut mpsc::Receiver<Message>) -> bool {
    let mut dropped = false;
    while control.try_recv().is_ok() || data.try_recv().is_ok() {
        dropped = true;
    }
    dropped
}

async fn run_peer(
    peer: Peer,
    mut control: mpsc::Receiver<Message>,
    mut data: mpsc::Receiver<Message>,
) {
    let mut backoff = peer.config.min_backoff;
    // Present at 0 from the start, so that dashboards show the peer before its first failure.
    metrics::counter!("etcd_network_peer_sent_failures_total", "To" => format!("{:x}", peer.id))
        .increment(0);
    loop {
        let channel = match connect(&peer).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = peer.id, url = %peer.url, error = %e, "cannot reach peer");
                if drain(&mut control, &mut data) {
                    peer.unreachable();
                }
                if control.is_closed() && data.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(peer.config.max_backoff);
                continue;
            }
        };
        *peer.active_since.lock() = Some(Instant::now());
        let prober = tokio::spawn(probe_round_trips(peer.id, channel.clone()));
        let ended = stream_until_broken(&peer, channel, &mut control, &mut data).await;
        prober.abort();
        *peer.active_since.lock() = None;
        match ended {
            StreamEnd::TransportGone => return,
            StreamEnd::Broken(status) => {
                if status.message().contains(crate::MEMBER_REMOVED) {
                    tracing::warn!(
                        peer = peer.id,
                        "a peer says this member was removed from the cluster"
                    );
                    if let Some(f) = peer.feedback.get() {
                        f.removed();
                    }
                } else if status.message().contains(CLUSTER_ID_MISMATCH) {
                    tracing::error!(peer = peer.id, url = %peer.url, "peer belongs to another cluster: {}", status.message());
                } else {
                    tracing::debug!(peer = peer.id, error = %status, "peer stream ended");
                }
                peer.unreachable();
                // A broken stream keeps growing the backoff (a peer that refuses every stream,
                // e.g. of another cluster, is not retried ten times a second); only a stream
                // that ended cleanly resets it.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(peer.config.max_backoff);
            }
            StreamEnd::Healthy => backoff = peer.config.min_backoff,
        }
    }
}

enum StreamEnd {
    /// Both queues are closed: the transport was dropped.
    TransportGone,
    /// The stream failed; reconnect after a backoff.
    Broken(tonic::Status),
    /// The stream ran and ended without an error; reconnect at once.
    Healthy,
}

async fn stream_until_broken(
    peer: &Peer,
    channel: Channel,
    control: &mut mpsc::Receiver<Message>,
    data: &mut mpsc::Receiver<Message>,
) -> StreamEnd {
    let (tx, rx) = mpsc::channel::<MessageBatch>(4);
    let mut client = RaftPeerClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let mut call = tokio::spawn(async move {
        client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let (mut control_open, mut data_open) = (true, true);
    let sent_bytes =
        metrics::counter!("etcd_network_peer_sent_bytes_total", "To" => format!("{:x}", peer.id));
    loop {
        if !control_open && !data_open {
            // The peer left the member table (or the transport was dropped): close the
            // stream, or the peer would keep it open for good.
            call.abort();
            return StreamEnd::TransportGone;
        }
        let first = tokio::select! {
            biased;
            ended = &mut call => {
                return match ended {
                    Ok(Ok(_)) => StreamEnd::Healthy,
                    Ok(Err(status)) => StreamEnd::Broken(status),
                    Err(join) => StreamEnd::Broken(tonic::Status::internal(join.to_string())),
                };
            }
            msg = control.recv(), if control_open => match msg {
                Some(msg) => msg,
                None => {
                    control_open = false;
                    continue;
                }
            },
            msg = data.recv(), if data_open => match msg {
                Some(msg) => msg,
                None => {
                    data_open = false;
                    continue;
                }
            },
        };
        let mut batch = MessageBatch {
            cluster_id: peer.cluster_id,
            from: peer.from,
            to: peer.id,
            messages: Vec::new(),
            version: crate::VERSION.to_string(),
            witness: peer.config.witness,
            durable_index: peer.durable.load(std::sync::atomic::Ordering::Acquire),
            data_durable_index: peer.data_durable.load(std::sync::atomic::Ordering::Acquire),
        };
        let mut bytes = 0;
        let mut next = Some(first);
        // Control first, then appends, up to the batch limits.
        while let Some(msg) = next.take() {
            if let Some(frame) = encode_message(&msg, peer.config.compress_above) {
                bytes += frame.len();
                batch.messages.push(frame);
            }
            if batch.messages.len() >= peer.config.max_batch_messages
                || bytes >= peer.config.max_batch_bytes
            {
                break;
            }
            next = control.try_recv().ok().or_else(|| data.try_recv().ok());
        }
        sent_bytes.increment(bytes as u64);
        if tx.send(batch).await.is_err() {
            // The call ended; its result says why.
            return match call.await {
                Ok(Ok(_)) => StreamEnd::Healthy,
                Ok(Err(status)) => StreamEnd::Broken(status),
                Err(join) => StreamEnd::Broken(tonic::Status::internal(join.to_string())),
            };
        }
    }
}

/// How often the round trip to a connected peer is measured (etcd's prober: every 5 s).
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Measures the round trip of a small request to the peer, on the raft stream's connection,
/// as etcd's `etcd_network_peer_round_trip_time_seconds`; a failed probe records nothing (the
/// stream's own failure is counted where it breaks).
async fn probe_round_trips(peer_id: u64, channel: Channel) {
    let rtt = metrics::histogram!(
        "etcd_network_peer_round_trip_time_seconds",
        "To" => format!("{peer_id:x}")
    );
    let mut client = RaftPeerClient::new(channel);
    loop {
        let started = Instant::now();
        if client
            .members(metastore_proto::metastore::peer::MembersRequest {})
            .await
            .is_ok()
        {
            rtt.record(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
