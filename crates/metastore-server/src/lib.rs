//! Wiring of the MetaStore crates into a running member. No logic beyond composition lives
//! here: configuration in, services out.

pub mod config;
mod identity;
pub mod logging;
pub mod version;

use config::{Config, ConfigError, StorageKind};
use identity::identity;
use metastore_api::apply::{ApplyDriver, CompleterSlot, Durability};
use metastore_api::{ClusterInfo, EtcdServer, MemberInfo, PeerVersionSource, ServiceConfig};
use metastore_engine::Engine;
use metastore_memory::MemoryEngine;
use metastore_mvcc::Store;
use metastore_raft::{NoPeers, RaftNode, Transport};
use metastore_rocksdb::RocksDbEngine;
use metastore_transport::{PeerService, PeerTransport, PeerVersions, TransportConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("data dir {0} belongs to another member: {1}")]
    Identity(PathBuf, String),
    #[error("state machine: {0}")]
    Store(#[from] metastore_mvcc::MvccError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("storage engine: {0}")]
    Engine(#[from] metastore_engine::EngineError),
    #[error("raft: {0}")]
    Raft(#[from] metastore_raft::RaftError),
    #[error("serving {0}: {1}")]
    Serve(std::net::SocketAddr, tonic::transport::Error),
    #[error("listen tcp {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    #[error("the raft member stopped: {0}")]
    MemberStopped(String),
    #[error("peer transport: {0}")]
    Transport(String),
}

/// A started member: the shared server state and its client listeners' addresses.
pub struct Member<E: Engine> {
    pub server: Arc<EtcdServer<E>>,
    pub config: Config,
    /// Filled by the peer service with what each peer announces.
    peer_versions: PeerVersions,
}

/// Starts a member on the configured engine and serves clients until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    match cfg.storage {
        StorageKind::Memory => serve(start_memory(cfg)?, shutdown).await,
        StorageKind::Rocksdb => serve(start_rocksdb(cfg)?, shutdown).await,
    }
}

/// The memory engine, rebuilt from the newest snapshot; the WAL replays what follows it.
pub fn start_memory(cfg: Config) -> Result<Member<MemoryEngine>, ServerError> {
    let member_dir = member_dir(&cfg)?;
    let engine = Arc::new(MemoryEngine::new());
    let snap_dir = member_dir.join("snap");
    let mut durable = 0;
    if let Some((index, path)) = metastore_mvcc::snapshot::list_snapshots(&snap_dir)
        .into_iter()
        .next()
    {
        let started = std::time::Instant::now();
        metastore_mvcc::snapshot::load_snapshot(engine.as_ref(), &path)?;
        tracing::info!(index, file = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "snapshot loaded");
        durable = index;
    }
    let durability = Durability::Snapshots {
        dir: snap_dir,
        every: cfg.snapshot_count,
        retention: cfg.snapshot_retention,
    };
    start(cfg, engine, durability, Some(durable))
}

/// The RocksDB engine: it holds its last flushed state; the WAL replays what follows it.
pub fn start_rocksdb(cfg: Config) -> Result<Member<RocksDbEngine>, ServerError> {
    let member_dir = member_dir(&cfg)?;
    let engine = Arc::new(RocksDbEngine::open(
        member_dir.join("rocksdb"),
        &cfg.rocksdb,
    )?);
    if let Some(index) = metastore_mvcc::interrupted_install(engine.as_ref())? {
        // A crash stopped the install of a leader's snapshot half-way: the engine holds a mix
        // of two states. The received file is kept until the install is recorded in the WAL.
        let path = metastore_raft::received_snapshot_path(&member_dir.join("wal"), index);
        tracing::warn!(index, file = %path.display(), "finishing an interrupted snapshot install");
        metastore_mvcc::replace_engine_contents(engine.as_ref(), &path, index)?;
    }
    let durability = Durability::Flush {
        every: cfg.snapshot_count,
    };
    start(cfg, engine, durability, None)
}

fn member_dir(cfg: &Config) -> Result<PathBuf, ServerError> {
    let dir = PathBuf::from(&cfg.data_dir).join("member");
    std::fs::create_dir_all(&dir).map_err(|e| ServerError::DataDir(dir.clone(), e))?;
    Ok(dir)
}

/// Opens the state machine over `engine`, starts raft and the API; does not listen yet.
/// `durable` is the index the engine already holds durably (None: what it recovered).
pub fn start<E: Engine>(
    cfg: Config,
    engine: Arc<E>,
    durability: Durability,
    durable: Option<u64>,
) -> Result<Member<E>, ServerError> {
    let members = cfg.initial_members()?;
    let member_dir = member_dir(&cfg)?;
    let identity = identity(&member_dir, &cfg, &members)?;
    let (member_id, cluster_id) = (identity.member_id, identity.cluster_id);
    let cluster_members: Vec<MemberInfo> = identity
        .members
        .iter()
        .map(|m| MemberInfo {
            id: m.id,
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: if m.id == member_id {
                cfg.advertise_client_urls()
            } else {
                Vec::new()
            },
        })
        .collect();
    if !cluster_members.iter().any(|m| m.id == member_id) {
        return Err(ServerError::Identity(
            member_dir.join("identity"),
            format!(
                "member id {member_id:x} is not in --initial-cluster {}",
                cfg.initial_cluster
            ),
        ));
    }
    let transport: Arc<dyn Transport> = if cluster_members.len() == 1 {
        Arc::new(NoPeers)
    } else {
        let peers = cluster_members
            .iter()
            .filter(|m| m.id != member_id)
            .filter_map(|m| m.peer_urls.first().map(|url| (m.id, url.clone())))
            .collect();
        Arc::new(
            PeerTransport::new(member_id, cluster_id, peers, TransportConfig::default())
                .map_err(|e| ServerError::Transport(e.to_string()))?,
        )
    };
    let store = Arc::new(Store::open(engine)?);
    store.spawn_watch_sync().map_err(ServerError::Thread)?;
    let slot = CompleterSlot::default();
    let durable = durable.unwrap_or_else(|| store.applied_index());
    let driver = ApplyDriver::new(
        store.clone(),
        slot.clone(),
        durability,
        durable,
        cfg.batch.apply_part_len,
    );
    let peer_versions = PeerVersions::default();
    let voters = cluster_members.iter().map(|m| m.id).collect();
    let raft = RaftNode::start(
        member_id,
        voters,
        member_dir.join("wal"),
        cfg.raft.clone(),
        transport,
        Box::new(driver),
    )?;
    let cluster = ClusterInfo {
        cluster_id,
        member_id,
        members: cluster_members,
    };
    let server = EtcdServer::new(
        store,
        raft,
        slot,
        cfg.batch.clone(),
        cfg.limits.clone(),
        cluster,
        ServiceConfig {
            lease: cfg.lease.clone(),
            watch_progress_interval: Duration::from_millis(
                cfg.watch_progress_notify_interval_ms.max(1),
            ),
            election_timeout: cfg.raft.tick_interval * cfg.raft.election_tick as u32,
            peer_versions: {
                let versions = peer_versions.clone();
                PeerVersionSource(Arc::new(move |id| versions.get(id)))
            },
        },
    );
    Ok(Member {
        server,
        config: cfg,
        peer_versions,
    })
}

/// Serves clients until `shutdown` resolves, then stops raft cleanly.
pub async fn serve<E: Engine>(
    member: Member<E>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addrs = member.config.client_addrs()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    // Peers first: replaying the log needs nobody, but the other members may need this one
    // to elect a leader meanwhile.
    if member.server.cluster.members.len() > 1 {
        for addr in member.config.peer_addrs()? {
            let service = PeerService::new(
                member.server.cluster.cluster_id,
                member.server.cluster.member_id,
                member.server.raft.clone(),
                member.peer_versions.clone(),
            );
            let incoming = tonic::transport::server::TcpIncoming::bind(addr)
                .map_err(|e| ServerError::Bind(addr, e))?
                .with_nodelay(Some(true));
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(service.into_server())
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
                    .map_err(|e| ServerError::Serve(addr, e))
            }));
            tracing::info!(%addr, "ready to serve peer traffic");
        }
    }
    // Serve nothing older than what was acknowledged before a restart.
    let started = std::time::Instant::now();
    member.server.raft.wait_replayed().await?;
    tracing::info!(
        applied = member.server.raft.status().applied_index,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "log replayed"
    );
    let grpc = &member.config.grpc;
    for addr in addrs {
        let routes = metastore_api::routes(member.server.clone());
        let mut stop = stop_rx.clone();
        let builder = tonic::transport::Server::builder()
            .tcp_nodelay(grpc.tcp_nodelay)
            .max_concurrent_streams(grpc.max_concurrent_streams)
            .initial_stream_window_size(grpc.initial_stream_window_size)
            .initial_connection_window_size(grpc.initial_connection_window_size)
            .http2_keepalive_interval(Some(Duration::from_millis(grpc.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(grpc.keepalive_timeout_ms)));
        let mut builder = builder.layer(tower::util::MapResponseLayer::new(
            metastore_api::errors::grpc_go_size_error::<tonic::body::Body>,
        ));
        let router = builder.add_routes(routes);
        // Bind here, not inside the task: a port that cannot be bound must stop the member
        // with an error, not leave it running and "ready" without a listener.
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)
            .map_err(|e| ServerError::Bind(addr, e))?
            .with_nodelay(Some(grpc.tcp_nodelay));
        tasks.push(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| ServerError::Serve(addr, e))
        }));
        tracing::info!(%addr, "ready to serve client requests");
    }
    // Under systemd (`Type=notify`, configs/metastore.service) the unit turns active only now,
    // with the log replayed and every listener bound, as etcd signals it. Outside systemd
    // (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the member is ready");
    }
    // A member whose raft or apply loop stopped can acknowledge nothing: exit so that a
    // supervisor restarts it, instead of answering every request with a timeout.
    let raft = member.server.raft.clone();
    let watchdog = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if raft.is_stopped() {
                return;
            }
        }
    };
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = watchdog => {
            tracing::error!("raft member stopped; shutting down");
            result = Err(ServerError::MemberStopped(format!("{:?}", member.server.raft.status())));
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            result = Err(e);
        }
    }
    let raft = member.server.raft.clone();
    let _ = tokio::task::spawn_blocking(move || raft.shutdown()).await;
    result
}
