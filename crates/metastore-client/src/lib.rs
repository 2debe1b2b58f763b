//! Client helper for MetaStore's batch API (`metastore.v1.Batch`).
//!
//! `BatchPut` writes up to [`MAX_BATCH_OPS`] keys in one raft proposal, atomically at one
//! revision; `BatchGet` reads many keys at one revision. See the crate README for an example.

use bytes::Bytes;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore_proto::metastore::v1::batch_client::BatchClient as GrpcBatchClient;
use metastore_proto::metastore::v1::{BatchGetRequest, BatchPutRequest};
use tonic::transport::{Channel, Endpoint};

pub use metastore_proto::metastore::v1::{BatchGetResponse, BatchPutResponse};

/// Most puts or ranges the server takes in one request.
pub const MAX_BATCH_OPS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Status(#[from] tonic::Status),
    #[error("the server answered {got} results for {sent} requests")]
    ShortAnswer { sent: usize, got: usize },
}

/// A connection to one MetaStore member's batch service. Cheap to clone (clones share the
/// HTTP/2 connection).
#[derive(Clone)]
pub struct BatchClient {
    inner: GrpcBatchClient<Channel>,
}

impl BatchClient {
    /// Connects to `endpoint` (`host:port` or `http://host:port`).
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|source| ClientError::Endpoint {
                endpoint: endpoint.to_string(),
                source,
            })?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (e.g. one shared with other tonic clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: GrpcBatchClient::new(channel).max_decoding_message_size(usize::MAX),
        }
    }

    /// The generated client, for requests with every field (`prev_kv`, leases, limits, …).
    pub fn inner(&mut self) -> &mut GrpcBatchClient<Channel> {
        &mut self.inner
    }

    /// Puts every `(key, value)` in one proposal and returns the revision they were all
    /// written at. At most [`MAX_BATCH_OPS`] pairs, each key once.
    pub async fn put_all<K, V>(
        &mut self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<i64, ClientError>
    where
        K: Into<Bytes>,
        V: Into<Bytes>,
    {
        let puts = pairs
            .into_iter()
            .map(|(key, value)| PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })
            .collect();
        let resp = self
            .inner
            .batch_put(BatchPutRequest { puts })
            .await?
            .into_inner();
        Ok(resp.header.map(|h| h.revision).unwrap_or_default())
    }

    /// Reads each key at one revision; `None` for keys that do not exist. Linearizable.
    pub async fn get_all<K: Into<Bytes>>(
        &mut self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<Bytes>>, ClientError> {
        let ranges: Vec<RangeRequest> = keys
            .into_iter()
            .map(|key| RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .collect();
        let sent = ranges.len();
        let resp = self
            .inner
            .batch_get(BatchGetRequest {
                ranges,
                serializable: false,
            })
            .await?
            .into_inner();
        if resp.responses.len() != sent {
            return Err(ClientError::ShortAnswer {
                sent,
                got: resp.responses.len(),
            });
        }
        Ok(resp
            .responses
            .into_iter()
            .map(|r| r.kvs.into_iter().next().map(|kv| kv.value))
            .collect())
    }
}
