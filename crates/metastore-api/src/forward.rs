//! Requests only the leader can answer, sent on to it from a follower: lease keep-alives (the
//! leader alone keeps lease time), as etcd forwards them to its leader.

use crate::{errors, EtcdServer};
use metastore_engine::Engine;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::LeaseKeepAliveRequest;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// How this member opens a channel to another member's client URL. The server supplies one
/// that speaks TLS to `https://` URLs; the default dials plain HTTP/2.
pub trait ClientDialer: Send + Sync + 'static {
    fn dial(&self, endpoint: Endpoint) -> Channel;
}

struct PlainDialer;

impl ClientDialer for PlainDialer {
    fn dial(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_lazy()
    }
}

#[derive(Clone)]
pub struct Dialer(pub std::sync::Arc<dyn ClientDialer>);

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

/// A connection to the current leader's client port, kept while it leads.
#[derive(Default)]
pub(crate) struct LeaderChannel {
    cached: parking_lot::Mutex<Option<(u64, Channel)>>,
}

/// How long a forwarded request may take: a keep-alive that cannot reach the leader in this
/// time fails, and the client retries (within its lease's TTL).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

impl<E: Engine> EtcdServer<E> {
    /// The first client URL `leader` published.
    pub(crate) fn leader_endpoint(&self, leader: u64) -> Result<Endpoint, Status> {
        let url = self
            .client_urls_of(leader)
            .into_iter()
            .next()
            // The leader has not published its client URLs yet (it just started).
            .ok_or_else(errors::no_leader)?;
        Endpoint::from_shared(url)
            .map_err(|e| Status::unavailable(format!("etcdserver: leader URL: {e}")))
    }

    pub(crate) fn leader_channel(&self, leader: u64) -> Result<Channel, Status> {
        let mut cached = self.leader_channel.cached.lock();
        if let Some((id, channel)) = cached.as_ref() {
            if *id == leader {
                return Ok(channel.clone());
            }
        }
        let endpoint = self
            .leader_endpoint(leader)?
            .connect_timeout(FORWARD_TIMEOUT)
            .timeout(FORWARD_TIMEOUT)
            .tcp_nodelay(true);
        let channel = self.dialer.0.dial(endpoint);
        *cached = Some((leader, channel.clone()));
        Ok(channel)
    }

    /// Renews lease `id` on the leader and returns the TTL it granted.
    pub(crate) async fn renew_on_leader(
        &self,
        id: i64,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<i64, Status> {
        let leader = self.raft.status().leader_id;
        if leader == 0 {
            return Err(errors::no_leader());
        }
        let mut client = LeaseClient::new(self.leader_channel(leader)?);
        let request = LeaseKeepAliveRequest { id };
        let call = async {
            let mut responses = client
                .lease_keep_alive(crate::auth::forwarded(
                    tokio_stream::once(request),
                    metadata,
                ))
                .await?
                .into_inner();
            match responses.message().await? {
                Some(resp) => Ok(resp.ttl),
                None => Err(errors::no_leader()),
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(errors::timeout()),
        }
    }
}
