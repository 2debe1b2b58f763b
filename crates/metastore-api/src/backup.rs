//! `Maintenance.Snapshot`: the state at one revision, in etcd's backend format (a bbolt file,
//! see `metastore_mvcc::snapshot`), streamed as etcd streams it: 32 KiB chunks carrying the
//! bytes still to come, then one message whose blob is the SHA-256 of everything before it
//! (which `etcdctl snapshot save` appends to the file and `snapshot restore` checks).
//!
//! The file is written to a temporary file in the member's directory first (disk, not memory,
//! holds a multi-GB state), from a capture taken between two applied entries while writes go
//! on; physical compaction waits only while the engine is read.

use crate::EtcdServer;
use futures::stream::BoxStream;
use metastore_engine::Engine;
use metastore_proto::etcdserverpb::SnapshotResponse;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use tonic::Status;

/// etcd's chunk size.
const CHUNK: usize = 32 * 1024;

pub(crate) async fn snapshot_stream<E: Engine>(
    server: Arc<EtcdServer<E>>,
) -> Result<BoxStream<'static, Result<SnapshotResponse, Status>>, Status> {
    let dir = server
        .snapshot_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let term = server.raft.term();
    let writer = server.clone();
    let (file, len, revision) = tokio::task::spawn_blocking(move || {
        let revision = writer.store.current_revision();
        let capture = writer.store.capture_snapshot()?;
        let mut file = tempfile::tempfile_in(&dir)
            .map_err(|e| metastore_mvcc::MvccError::Engine(format!("{}: {e}", dir.display())))?;
        let len = capture.write_etcd_backend(writer.store.engine().as_ref(), &mut file, term)?;
        Ok::<_, metastore_mvcc::MvccError>((file, len, revision))
    })
    .await
    .map_err(|e| Status::internal(format!("snapshot writer: {e}")))?
    .map_err(|e| Status::internal(format!("etcdserver: {e}")))?;
    tracing::info!(size = len, revision, "sending database snapshot to client");
    let mut header = Some(server.header(revision));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotResponse, Status>>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        let send = |message| tx.blocking_send(message).is_ok();
        if let Err(e) = file.seek(SeekFrom::Start(0)) {
            let _ = send(Err(Status::internal(e.to_string())));
            return;
        }
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        while sent < len {
            let n = match file.read(&mut buf) {
                Ok(0) => {
                    let _ = send(Err(Status::internal("snapshot file ended early")));
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    let _ = send(Err(Status::internal(e.to_string())));
                    return;
                }
            };
            let n = n.min((len - sent) as usize);
            hash.update(&buf[..n]);
            sent += n as u64;
            let message = SnapshotResponse {
                header: header.take(),
                remaining_bytes: len - sent,
                blob: bytes::Bytes::copy_from_slice(&buf[..n]),
            };
            if !send(Ok(message)) {
                return;
            }
        }
        let _ = send(Ok(SnapshotResponse {
            header: None,
            remaining_bytes: 0,
            blob: bytes::Bytes::copy_from_slice(&hash.finalize()),
        }));
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
