//! A do-nothing etcd KV server: Put and Range answer at once without storing anything.
//!
//! It measures the ceiling of one-operation unary gRPC requests on a machine (HTTP/2, tonic,
//! the kernel's loopback), the yardstick the real server's throughput is compared with.
//!
//! With `defer`, a Put is answered only after another thread has taken it off a queue: the
//! hand-off every server makes that answers a write after its commit, not in the poll that read
//! it. The cost of that pattern alone (a second poll of each request's task, a wake from a
//! foreign thread, state gone cold while the request waits) is then measured apart from the
//! cost of the consensus and storage work behind it.

use metastore_proto::etcdserverpb::kv_server::{Kv, KvServer};
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct NoopKv {
    revision: AtomicI64,
    /// Where Puts wait to be answered, when deferred.
    deferral: Option<mpsc::UnboundedSender<oneshot::Sender<()>>>,
}

impl NoopKv {
    /// A no-op whose Puts are answered by a separate thread. As in MetaStore, a task on the
    /// runtime gathers whatever Puts are queued into one batch and hands it over, and the
    /// thread answers the batch's requests (MetaStore's apply thread does the same once the
    /// batch is committed).
    fn deferred() -> std::io::Result<Self> {
        let (queue, mut queued) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let (batches, batch_rx) = flume::unbounded::<Vec<oneshot::Sender<()>>>();
        std::thread::Builder::new()
            .name("noop-answer".into())
            .spawn(move || {
                while let Ok(batch) = batch_rx.recv() {
                    for answer in batch {
                        let _ = answer.send(());
                    }
                }
            })?;
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = queued.try_recv() {
                    batch.push(next);
                }
                if batches.send(batch).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            revision: AtomicI64::new(0),
            deferral: Some(queue),
        })
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

#[tonic::async_trait]
impl Kv for NoopKv {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Ok(Response::new(RangeResponse {
            header: header(self.revision.load(Ordering::Relaxed)),
            ..Default::default()
        }))
    }

    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        if let Some(deferral) = &self.deferral {
            let (answer, answered) = oneshot::channel();
            let stopped = || Status::unavailable("noop server: the answering thread stopped");
            deferral.send(answer).map_err(|_| stopped())?;
            answered.await.map_err(|_| stopped())?;
        }
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Response::new(PutResponse {
            header: header(revision),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("noop server: only Put and Range"))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("noop server: only Put and Range"))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("noop server: only Put and Range"))
    }
}

/// Serves the no-op KV on `addr` until the process ends; `defer` answers Puts from another
/// thread (see the module's doc).
pub async fn serve(addr: SocketAddr, defer: bool) -> anyhow::Result<()> {
    let kv = if defer {
        NoopKv::deferred()?
    } else {
        NoopKv::default()
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(KvServer::new(kv))
        .serve(addr)
        .await?;
    Ok(())
}
