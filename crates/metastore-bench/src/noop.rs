//! A do-nothing etcd KV server: Put and Range answer at once without storing anything.
//!
//! It measures the ceiling of one-operation unary gRPC requests on a machine (HTTP/2, tonic,
//! the kernel's loopback), the yardstick the real server's throughput is compared with.

use metastore_proto::etcdserverpb::kv_server::{Kv, KvServer};
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct NoopKv {
    revision: AtomicI64,
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

/// Serves the no-op KV on `addr` until the process ends.
pub async fn serve(addr: SocketAddr) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(KvServer::new(NoopKv::default()))
        .serve(addr)
        .await
}
