//! `metastore.v1.Batch`: many puts in one raft proposal, many reads at one revision.
//!
//! A `BatchPut` becomes one txn command with only puts, so it travels as one command of one
//! raft entry and is applied atomically at one revision, with the same checks an etcd txn
//! gets (empty keys, duplicate keys, lease rules, request size, quota).

use crate::services::{unexpected, Svc};
use crate::{errors, validate};
use metastore_engine::Engine;
use metastore_mvcc::ApplyResponse;
use metastore_proto::etcdserverpb::{request_op, response_op, RequestOp, TxnRequest};
use metastore_proto::internal::command::Op;
use metastore_proto::metastore::v1::batch_server::Batch;
use metastore_proto::metastore::v1::{
    BatchGetRequest, BatchGetResponse, BatchPutRequest, BatchPutResponse,
};
use tonic::{Request, Response, Status};

/// Most puts in one `BatchPut` and ranges in one `BatchGet`.
pub const MAX_BATCH_OPS: usize = 1000;

fn too_many(what: &str, n: usize) -> Status {
    Status::invalid_argument(format!(
        "metastore: a batch holds at most {MAX_BATCH_OPS} {what}, got {n}"
    ))
}

#[tonic::async_trait]
impl<E: Engine> Batch for Svc<E> {
    async fn batch_put(
        &self,
        request: Request<BatchPutRequest>,
    ) -> Result<Response<BatchPutResponse>, Status> {
        let who = self.0.auth_info(request.metadata())?;
        let puts = request.into_inner().puts;
        if puts.is_empty() {
            return Err(Status::invalid_argument("metastore: empty batch"));
        }
        if puts.len() > MAX_BATCH_OPS {
            return Err(too_many("puts", puts.len()));
        }
        let txn = TxnRequest {
            compare: Vec::new(),
            success: puts
                .into_iter()
                .map(|p| RequestOp {
                    request: Some(request_op::Request::RequestPut(p)),
                })
                .collect(),
            failure: Vec::new(),
        };
        // The txn checks: every put's own rules, and no key twice.
        validate::check_txn(&txn, MAX_BATCH_OPS)?;
        let header = crate::EtcdServer::<E>::auth_header(who.as_ref());
        let resp = match self.0.submit_as(Op::Txn(txn), Some(header)).await? {
            ApplyResponse::Txn(resp) => resp,
            _ => return Err(unexpected("batch put")),
        };
        let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or_default();
        let mut responses = Vec::with_capacity(resp.responses.len());
        for op in resp.responses {
            match op.response {
                Some(response_op::Response::ResponsePut(mut put)) => {
                    // The batch header carries the revision; don't repeat it per put.
                    put.header = None;
                    responses.push(put);
                }
                _ => return Err(unexpected("batch put")),
            }
        }
        Ok(Response::new(BatchPutResponse {
            header: Some(self.0.header(revision)),
            responses,
        }))
    }

    async fn batch_get(
        &self,
        request: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        let req = request.into_inner();
        if req.ranges.is_empty() {
            return Err(Status::invalid_argument("metastore: empty batch"));
        }
        if req.ranges.len() > MAX_BATCH_OPS {
            return Err(too_many("ranges", req.ranges.len()));
        }
        for r in &req.ranges {
            validate::check_range(r)?;
        }
        let txn = TxnRequest {
            compare: Vec::new(),
            success: req
                .ranges
                .into_iter()
                .map(|r| RequestOp {
                    request: Some(request_op::Request::RequestRange(r)),
                })
                .collect(),
            failure: Vec::new(),
        };
        self.read_barrier(req.serializable).await?;
        let resp = self
            .0
            .store
            .read_txn_bounded(&txn, self.0.limits.max_response_bytes)
            .map_err(errors::from_mvcc)?;
        let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or_default();
        let mut responses = Vec::with_capacity(resp.responses.len());
        for op in resp.responses {
            match op.response {
                Some(response_op::Response::ResponseRange(mut range)) => {
                    range.header = None;
                    responses.push(range);
                }
                _ => return Err(unexpected("batch get")),
            }
        }
        Ok(Response::new(BatchGetResponse {
            header: Some(self.0.header(revision)),
            responses,
        }))
    }
}
