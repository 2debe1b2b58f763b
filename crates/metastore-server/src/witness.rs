//! A witness member (`--witness`): raft, the WAL and the peer transport, and nothing else. It
//! votes and keeps the log, so that two data members and a witness survive the loss of any one
//! of the three; it holds no data, hands leadership away whenever it is elected, and answers
//! every client request with an error that names it.

use crate::config::Config;
use crate::identity::identity;
use crate::listen::serve_peers;
use crate::{bootstrap_of, member_dir, ServerError};
use metastore_raft::witness::WitnessLog;
use metastore_raft::RaftNode;
use metastore_transport::{
    MembersResponse, PeerMember, PeerService, PeerTransport, PeerVersions, TransportConfig,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let flags = cfg.initial_members()?;
    let dir = member_dir(&cfg)?;
    let identity = identity(&dir, &cfg, &flags).await?;
    let (member_id, cluster_id) = (identity.member_id, identity.cluster_id);
    // A witness has no member table of its own (it applies nothing): its peers are the
    // members it bootstrapped or joined with.
    let peers: HashMap<u64, String> = identity
        .members
        .iter()
        .filter(|m| m.id != member_id)
        .filter_map(|m| m.peer_urls.first().map(|u| (m.id, u.clone())))
        .collect();
    let transport = Arc::new(PeerTransport::new(
        member_id,
        cluster_id,
        peers.clone(),
        TransportConfig {
            witness: true,
            dialer: cfg.peer_dialer(),
            ..TransportConfig::default()
        },
    )?);
    let versions = PeerVersions::default();
    let data_durable = {
        let versions = versions.clone();
        Box::new(move || versions.data_durable_index())
    };
    let log = WitnessLog::open(dir.join("witness-index"), data_durable)?;
    let mut raft_config = cfg.raft.clone();
    raft_config.witness = true;
    let raft = RaftNode::start(
        member_id,
        bootstrap_of(&identity),
        dir.join("wal"),
        raft_config,
        transport.clone(),
        Box::new(log),
    )?;
    tracing::info!(
        member = format_args!("{member_id:x}"),
        "running as a witness: raft log only, no data, no clients"
    );

    spawn_publisher(raft.clone(), member_id, cfg.name.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let members = identity.members.clone();
    let members_source: metastore_transport::MembersSource = Arc::new(move || MembersResponse {
        cluster_id,
        members: members
            .iter()
            .map(|m| PeerMember {
                id: m.id,
                name: m.name.clone(),
                peer_urls: m.peer_urls.clone(),
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect(),
    });
    for listener in cfg.peer_listeners()? {
        let service = PeerService::new(
            cluster_id,
            member_id,
            raft.clone(),
            versions.clone(),
            members_source.clone(),
            Arc::new(|_| false),
        );
        tasks.push(serve_peers(listener, &cfg, service, stop_rx.clone())?);
    }
    for addr in cfg.client_addrs()? {
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)
            .map_err(|e| ServerError::Bind(addr, e))?;
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_routes(metastore_api::witness_routes())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| ServerError::Serve(addr, e))
        }));
        tracing::info!(%addr, "answering clients that this member is a witness");
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the member is ready");
    }
    let watched = raft.clone();
    let watchdog = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if watched.is_removed() || watched.is_stopped() {
                return watched.is_removed();
            }
        }
    };
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        removed = watchdog => {
            if removed {
                tracing::warn!("the member has been permanently removed from the cluster; shutting down");
            } else {
                tracing::error!("raft member stopped; shutting down");
                result = Err(ServerError::MemberStopped(format!("{:?}", raft.status())));
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    drop(transport);
    // Nothing a witness serves is worth waiting for: its clients only get an error, and
    // raft loses nothing by a peer message cut short.
    for t in tasks {
        t.abort();
    }
    let _ = tokio::task::spawn_blocking(move || raft.shutdown()).await;
    result
}

/// Publishes this member's name and witness flag through raft (no client URLs: it serves no
/// clients), so that every member's `member list` shows it as a witness. A witness cannot
/// read back what was applied, so it publishes again at every change of leader (the same
/// attributes, applied idempotently), which also covers a proposal lost with a leader.
fn spawn_publisher(raft: RaftNode, member_id: u64, name: String) {
    use metastore_proto::internal::{command::Op, Batch, Command, MemberAttrSet};
    let batch = Batch {
        id: 0,
        commands: vec![Command {
            auth: None,
            op: Some(Op::MemberAttrSet(MemberAttrSet {
                member_id,
                name,
                client_urls: Vec::new(),
                is_witness: true,
            })),
        }],
    };
    let frame = metastore_codec::encode_batch(&batch, &metastore_codec::CodecOptions::default());
    tokio::spawn(async move {
        let mut leadership = raft.leadership();
        loop {
            let leader = leadership.borrow_and_update().1;
            if leader != 0 {
                if let Err(e) = raft.propose(frame.to_vec()).await {
                    tracing::debug!(error = %e, "cannot publish the witness's attributes yet");
                }
            }
            if raft.is_stopped() || leadership.changed().await.is_err() {
                return;
            }
        }
    });
}
