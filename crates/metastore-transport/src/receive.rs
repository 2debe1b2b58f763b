//! The receiving side: the `RaftPeer` service on the peer port.

use crate::{decode_message, PeerVersions, CLUSTER_ID_MISMATCH};
use metastore_proto::metastore::peer::raft_peer_server::{RaftPeer, RaftPeerServer};
use metastore_proto::metastore::peer::{
    MembersRequest, MembersResponse, MessageBatch, SnapshotAck, SnapshotChunk, StreamEnd,
};
use metastore_raft::RaftNode;
use tonic::{Request, Response, Status, Streaming};

/// The member table as this member knows it, for the `Members` RPC.
pub type MembersSource = std::sync::Arc<dyn Fn() -> MembersResponse + Send + Sync>;

/// Whether a member id was removed from the cluster for good.
pub type RemovedSource = std::sync::Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Steps every message that arrives from a peer of this cluster into the local raft node.
pub struct PeerService {
    cluster_id: u64,
    local_id: u64,
    node: RaftNode,
    versions: PeerVersions,
    members: MembersSource,
    removed: RemovedSource,
}

impl PeerService {
    /// `versions` records the version each peer announces; `members` answers `Members`.
    pub fn new(
        cluster_id: u64,
        local_id: u64,
        node: RaftNode,
        versions: PeerVersions,
        members: MembersSource,
        removed: RemovedSource,
    ) -> Self {
        Self {
            cluster_id,
            local_id,
            node,
            versions,
            members,
            removed,
        }
    }

    pub fn into_server(self) -> RaftPeerServer<Self> {
        RaftPeerServer::new(self)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn check(&self, batch: &MessageBatch) -> Result<(), Status> {
        if batch.cluster_id != self.cluster_id {
            tracing::warn!(
                from = format_args!("{:x}", batch.from),
                remote_cluster = format_args!("{:x}", batch.cluster_id),
                local_cluster = format_args!("{:x}", self.cluster_id),
                "refusing a peer of another cluster"
            );
            return Err(Status::failed_precondition(CLUSTER_ID_MISMATCH));
        }
        if (self.removed)(batch.from) {
            // As etcd answers a removed member's peer traffic: it learns it was removed (its
            // own log may end before the change) and stops.
            return Err(Status::failed_precondition(crate::MEMBER_REMOVED));
        }
        if batch.to != self.local_id {
            return Err(Status::failed_precondition(format!(
                "etcdserver: member ID mismatch: the batch is for {:x}, this member is {:x}",
                batch.to, self.local_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn stream(
        &self,
        request: Request<Streaming<MessageBatch>>,
    ) -> Result<Response<StreamEnd>, Status> {
        let mut stream = request.into_inner();
        let mut received_bytes = None;
        while let Some(batch) = stream.message().await? {
            self.check(&batch)?;
            received_bytes
                .get_or_insert_with(|| {
                    metrics::counter!(
                        "etcd_network_peer_received_bytes_total",
                        "From" => format!("{:x}", batch.from)
                    )
                })
                .increment(batch.messages.iter().map(|m| m.len() as u64).sum());
            self.versions.record(
                batch.from,
                &batch.version,
                batch.witness,
                batch.durable_index,
                batch.data_durable_index,
            );
            for frame in &batch.messages {
                let msg =
                    decode_message(frame).map_err(|e| Status::invalid_argument(e.to_string()))?;
                if msg.to != self.local_id {
                    return Err(Status::invalid_argument(format!(
                        "raft message for member {:x} on member {:x}",
                        msg.to, self.local_id
                    )));
                }
                if self.node.step(msg).is_err() {
                    return Err(Status::unavailable("etcdserver: server stopped"));
                }
            }
        }
        Ok(Response::new(StreamEnd {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        crate::snapshot::receive_snapshot(
            self.cluster_id,
            self.local_id,
            &self.node,
            &self.versions,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(SnapshotAck {}))
    }

    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new((self.members)()))
    }
}

/// Asks the member at `peer_url` for the cluster it belongs to (a member joining with
/// `--initial-cluster-state existing`, or checking that it was not bootstrapped already).
pub async fn fetch_members(
    peer_url: &str,
    timeout: std::time::Duration,
    dialer: &crate::Dialer,
) -> Result<MembersResponse, crate::TransportError> {
    use metastore_proto::metastore::peer::raft_peer_client::RaftPeerClient;
    let fail = |e: String| crate::TransportError::Members(peer_url.to_string(), e);
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(peer_url.to_string())
            .map_err(|e| fail(e.to_string()))?
            .connect_timeout(timeout);
        let channel = dialer
            .0
            .connect(endpoint)
            .await
            .map_err(|e| fail(e.to_string()))?;
        RaftPeerClient::new(channel)
            .members(MembersRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| fail(e.message().to_string()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| fail("timed out".into()))?
}
