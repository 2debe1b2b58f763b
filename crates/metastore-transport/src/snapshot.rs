//! Snapshots between members: the file beside a raft `MsgSnapshot`, streamed in chunks on its
//! own RPC so that it never holds up heartbeats and appends, with bounded memory on both
//! sides (a few chunks in flight, whatever the file's size).

use crate::{PeerVersions, TransportConfig, CLUSTER_ID_MISMATCH};
use metastore_proto::metastore::peer::raft_peer_client::RaftPeerClient;
use metastore_proto::metastore::peer::{SnapshotChunk, SnapshotHeader};
use metastore_raft::eraftpb::{Message, MessageType};
use metastore_raft::{PeerFeedback, RaftNode, SnapshotFile};
use protobuf::Message as _;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Endpoint;
use tonic::{Status, Streaming};

/// Most file bytes in one chunk.
pub(crate) const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Where a snapshot goes and who sends it.
pub(crate) struct SnapshotSend {
    pub url: String,
    pub cluster_id: u64,
    pub from: u64,
    pub config: TransportConfig,
}

/// Sends the file of `msg` (a `MsgSnapshot`) to its member and tells raft how it went.
pub(crate) async fn send_snapshot(target: SnapshotSend, msg: Message, feedback: PeerFeedback) {
    let to = msg.to;
    let index = msg.get_snapshot().get_metadata().index;
    let started = std::time::Instant::now();
    let result = match feedback.snapshot_file(&msg) {
        Some((path, file)) => stream_file(&target, &msg, &path, file).await,
        None => Err(format!(
            "the snapshot at index {index} is no longer held (a newer one replaced it)"
        )),
    };
    match &result {
        Ok(bytes) => tracing::info!(
            to = format_args!("{to:x}"),
            index,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot sent"
        ),
        Err(e) => {
            tracing::warn!(to = format_args!("{to:x}"), index, error = %e, "snapshot send failed")
        }
    }
    feedback.snapshot_sent(to, result.is_ok());
}

async fn stream_file(
    target: &SnapshotSend,
    msg: &Message,
    path: &Path,
    file: SnapshotFile,
) -> Result<u64, String> {
    let endpoint = Endpoint::from_shared(target.url.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(target.config.connect_timeout)
        .tcp_nodelay(true);
    let channel = target
        .config
        .dialer
        .0
        .connect(endpoint)
        .await
        .map_err(|e| format!("connect {}: {e}", target.url))?;
    let mut client = RaftPeerClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let header = SnapshotHeader {
        cluster_id: target.cluster_id,
        from: target.from,
        to: msg.to,
        version: crate::VERSION.to_string(),
        message: msg.write_to_bytes().map_err(|e| e.to_string())?.into(),
    };
    let mut reader = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Two chunks queued at most: memory stays bounded however large the file is.
    let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(2);
    let call = tokio::spawn(async move {
        client
            .snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut header = Some(header);
    let mut sent = 0u64;
    loop {
        let mut data = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            let n = reader
                .read(&mut data[filled..])
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        data.truncate(filled);
        let last = filled < CHUNK_BYTES;
        sent += filled as u64;
        let chunk = SnapshotChunk {
            header: header.take(),
            crc32: crc32fast::hash(&data),
            data: data.into(),
        };
        if tx.send(chunk).await.is_err() || last {
            break;
        }
    }
    drop(tx);
    if sent != file.size {
        return Err(format!(
            "{} has {sent} bytes, its descriptor says {}",
            path.display(),
            file.size
        ));
    }
    match call.await {
        Ok(Ok(_)) => Ok(sent),
        Ok(Err(status)) => Err(status.to_string()),
        Err(join) => Err(join.to_string()),
    }
}

/// The receiving side: writes the file next to the raft node, checks every chunk and the
/// whole file, then steps the message. Returns once the node has it.
pub(crate) async fn receive_snapshot(
    cluster_id: u64,
    local_id: u64,
    node: &RaftNode,
    versions: &PeerVersions,
    mut stream: Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
    let header = first
        .header
        .clone()
        .ok_or_else(|| Status::invalid_argument("the first snapshot chunk has no header"))?;
    if header.cluster_id != cluster_id {
        return Err(Status::failed_precondition(CLUSTER_ID_MISMATCH));
    }
    if header.to != local_id {
        return Err(Status::failed_precondition(format!(
            "etcdserver: member ID mismatch: the snapshot is for {:x}, this member is {local_id:x}",
            header.to
        )));
    }
    versions.record_version(header.from, &header.version);
    let mut msg = Message::default();
    msg.merge_from_bytes(&header.message)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
    if msg.get_msg_type() != MessageType::MsgSnapshot || msg.to != local_id {
        return Err(Status::invalid_argument(
            "the snapshot stream does not carry a snapshot for this member",
        ));
    }
    let file = SnapshotFile::decode(msg.get_snapshot().get_data())
        .ok_or_else(|| Status::invalid_argument("the snapshot names no file"))?;
    let index = msg.get_snapshot().get_metadata().index;
    let path = node.received_snapshot_path(index);
    let tmp = path.with_extension("tmp");
    let written = write_chunks(&tmp, first, &mut stream, file).await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
    tracing::info!(
        from = format_args!("{:x}", header.from),
        index,
        bytes = file.size,
        "snapshot received"
    );
    node.step(msg)
        .map_err(|_| Status::unavailable("etcdserver: server stopped"))
}

async fn write_chunks(
    tmp: &PathBuf,
    first: SnapshotChunk,
    stream: &mut Streaming<SnapshotChunk>,
    file: SnapshotFile,
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("{}: {e}", tmp.display()));
    if let Some(dir) = tmp.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    let mut out = tokio::fs::File::create(tmp).await.map_err(io)?;
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    let mut next = Some(first);
    while let Some(chunk) = next.take() {
        if crc32fast::hash(&chunk.data) != chunk.crc32 {
            return Err(Status::data_loss(format!(
                "snapshot chunk at byte {size} fails its CRC"
            )));
        }
        size += chunk.data.len() as u64;
        if size > file.size {
            return Err(Status::invalid_argument(format!(
                "the snapshot is longer than its {} bytes",
                file.size
            )));
        }
        crc.update(&chunk.data);
        out.write_all(&chunk.data).await.map_err(io)?;
        next = stream.message().await?;
    }
    if size != file.size || crc.finalize() != file.crc32 {
        return Err(Status::data_loss(format!(
            "the snapshot file does not match its descriptor ({size} of {} bytes, or a CRC mismatch)",
            file.size
        )));
    }
    out.sync_all().await.map_err(io)?;
    Ok(())
}
