//! Wiring of the MetaStore crates into a running member. No logic beyond composition lives
//! here: configuration in, services out.

pub mod config;
mod identity;
mod listen;
pub mod logging;
pub mod restore;
pub mod tls;
pub mod tools;
pub mod version;
mod witness;

use config::{Config, ConfigError, StorageKind};
use identity::identity;
use metastore_api::apply::{ApplyDriver, CompleterSlot, Durability};
use metastore_api::{
    ClusterInfo, EtcdServer, MemberIdSource, MembershipConfig, PeerHealthSource, PeerVersionSource,
    ServiceConfig, WitnessSource,
};
use metastore_engine::Engine;
use metastore_memory::MemoryEngine;
use metastore_mvcc::Store;
use metastore_proto::internal::{member_change::Kind, MemberChange, MemberRecord};
use metastore_raft::{Bootstrap, RaftNode};
use metastore_rocksdb::RocksDbEngine;
use metastore_transport::{
    MembersResponse, PeerMember, PeerService, PeerTransport, PeerVersions, TransportConfig,
};
use prost::Message as _;
use std::collections::HashMap;
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
    Transport(#[from] metastore_transport::TransportError),
    #[error("the member has been permanently removed from the cluster")]
    Removed,
    #[error("witness log: {0}")]
    WitnessLog(#[from] metastore_raft::witness::WitnessLogError),
    #[error(transparent)]
    Metrics(#[from] metastore_api::observe::ObserveError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// A started member: the shared server state and its client listeners' addresses.
pub struct Member<E: Engine> {
    pub server: Arc<EtcdServer<E>>,
    pub config: Config,
    /// Filled by the peer service with what each peer announces.
    peer_versions: PeerVersions,
    transport: Arc<PeerTransport>,
}

/// Starts a member on the configured engine and serves clients until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if cfg.witness {
        return witness::run(cfg, shutdown).await;
    }
    match cfg.storage {
        StorageKind::Memory => serve(start_memory(cfg).await?, shutdown).await,
        StorageKind::Rocksdb => serve(start_rocksdb(cfg).await?, shutdown).await,
    }
}

/// The memory engine, rebuilt from the newest snapshot; the WAL replays what follows it.
pub async fn start_memory(cfg: Config) -> Result<Member<MemoryEngine>, ServerError> {
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
    start(cfg, engine, durability, Some(durable)).await
}

/// The RocksDB engine: it holds its last flushed state; the WAL replays what follows it.
pub async fn start_rocksdb(cfg: Config) -> Result<Member<RocksDbEngine>, ServerError> {
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
    start(cfg, engine, durability, None).await
}

pub(crate) fn member_dir(cfg: &Config) -> Result<PathBuf, ServerError> {
    let dir = PathBuf::from(&cfg.data_dir).join("member");
    std::fs::create_dir_all(&dir).map_err(|e| ServerError::DataDir(dir.clone(), e))?;
    Ok(dir)
}

/// Opens the state machine over `engine`, starts raft and the API; does not listen yet.
/// `durable` is the index the engine already holds durably (None: what it recovered).
pub async fn start<E: Engine>(
    cfg: Config,
    engine: Arc<E>,
    durability: Durability,
    durable: Option<u64>,
) -> Result<Member<E>, ServerError> {
    let flags = cfg.initial_members()?;
    metastore_api::observe::install()?;
    let member_dir = member_dir(&cfg)?;
    let identity = identity(&member_dir, &cfg, &flags).await?;
    let (member_id, cluster_id) = (identity.member_id, identity.cluster_id);
    if !identity.joined && !identity.members.iter().any(|m| m.id == member_id) {
        return Err(ServerError::Identity(
            member_dir.join("identity"),
            format!(
                "member id {member_id:x} is not in --initial-cluster {}",
                cfg.initial_cluster
            ),
        ));
    }
    let boot_records = boot_records(&identity);
    let store = Arc::new(Store::open(engine)?);
    if store.members().is_empty() && identity.restarted && !identity.joined {
        // A data dir from before the member table: its bootstrap members are the table (the
        // log has no bootstrap entries to give it). For a newer data dir whose table comes
        // back only with the log replay (the memory engine without a snapshot), this records
        // the same members the replay then records again, before anything is served.
        store.seed_members(boot_records.clone())?;
    }
    if store.removed_members().contains(&member_id) {
        return Err(ServerError::Removed);
    }
    // The peers: the member table once this member has one, else who it bootstrapped or
    // joined with.
    let table = store.members();
    let peers: HashMap<u64, String> = if table.is_empty() {
        boot_records
            .iter()
            .filter_map(|m| m.peer_urls.first().map(|u| (m.id, u.clone())))
            .collect()
    } else {
        peer_map(&table)
    };
    let transport = Arc::new(PeerTransport::new(
        member_id,
        cluster_id,
        peers,
        TransportConfig {
            dialer: cfg.peer_dialer(),
            ..TransportConfig::default()
        },
    )?);
    store.spawn_watch_sync().map_err(ServerError::Thread)?;
    store.spawn_compactor().map_err(ServerError::Thread)?;
    let slot = CompleterSlot::default();
    let durable = durable.unwrap_or_else(|| store.applied_index());
    let driver = ApplyDriver::new(
        store.clone(),
        slot.clone(),
        durability,
        durable,
        cfg.batch.apply_part_len,
    )
    .share_durable(transport.durable_index_cell());
    let peer_versions = PeerVersions::default();
    let bootstrap = bootstrap_of(&identity);
    if !cfg.raft.wal_sync {
        tracing::warn!(
            "raft.wal-sync is false: UNSAFE, the WAL is not fsynced before a write is \
             acknowledged, so a crash or power loss can lose acknowledged writes (benchmarks only)"
        );
    }
    let raft = RaftNode::start(
        member_id,
        bootstrap,
        member_dir.join("wal"),
        cfg.raft.clone(),
        transport.clone(),
        Box::new(driver),
    )?;
    let cluster = ClusterInfo {
        cluster_id,
        member_id,
        name: cfg.name.clone(),
        client_urls: cfg.advertise_client_urls(),
    };
    let token = cfg.initial_cluster_token.clone();
    let health = transport.clone();
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
            cors: metastore_api::http::Cors::new(&cfg.cors),
            extensive_metrics: cfg.metrics == config::MetricsLevel::Extensive,
            warning_apply_duration: cfg.warning_apply_duration()?,
            snapshot_dir: Some(member_dir.clone()),
            auth: cfg.auth()?,
            dialer: metastore_api::forward::Dialer(Arc::new(tls::TlsDialer {
                settings: cfg.tls.clone(),
            })),
            peer_versions: {
                let versions = peer_versions.clone();
                PeerVersionSource(Arc::new(move |id| versions.get(id)))
            },
            membership: MembershipConfig {
                strict_reconfig_check: cfg.strict_reconfig_check,
                max_learners: cfg.max_learners,
                peer_health: PeerHealthSource(Arc::new(move |id| health.active_since(id))),
                witnesses: {
                    let versions = peer_versions.clone();
                    WitnessSource(Arc::new(move |id| versions.is_witness(id)))
                },
                new_member_id: MemberIdSource(Arc::new(move |urls| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default();
                    identity::runtime_member_id(urls, &token, now)
                })),
            },
        },
    );
    metastore_api::compactor::spawn(
        &server,
        cfg.auto_compaction()?,
        Duration::from_millis(cfg.auto_compaction_revision_interval_ms.max(1)),
    );
    spawn_peer_sync(&server, transport.clone());
    spawn_data_durable_announcer(&server, &transport, peer_versions.clone());
    Ok(Member {
        server,
        config: cfg,
        peer_versions,
        transport,
    })
}

/// The members as the member table records them at bootstrap.
fn boot_records(identity: &identity::Identity) -> Vec<MemberRecord> {
    identity
        .members
        .iter()
        .map(|m| MemberRecord {
            id: m.id,
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            is_learner: false,
        })
        .collect()
}

/// How a new WAL starts: a new cluster's log begins with one `AddNode` per member (the same
/// bytes on every member, the witness included); a joining member waits for the leader's.
fn bootstrap_of(identity: &identity::Identity) -> Bootstrap {
    if identity.joined {
        return Bootstrap::Join;
    }
    Bootstrap::NewCluster(
        boot_records(identity)
            .into_iter()
            .map(|m| {
                let id = m.id;
                let change = MemberChange {
                    kind: Kind::Add as i32,
                    member: Some(m),
                };
                (id, change.encode_to_vec())
            })
            .collect(),
    )
}

/// Every member's first peer URL but this member's.
fn peer_map(table: &std::collections::BTreeMap<u64, MemberRecord>) -> HashMap<u64, String> {
    table
        .values()
        .filter_map(|m| m.peer_urls.first().map(|u| (m.id, u.clone())))
        .collect()
}

/// Keeps the transport's peers equal to the member table's as membership changes apply.
fn spawn_peer_sync<E: Engine>(server: &Arc<EtcdServer<E>>, transport: Arc<PeerTransport>) {
    // Weak: the store (and a RocksDB engine under it) must close when the server goes, not
    // when the runtime drops this task at exit.
    let store = Arc::downgrade(&server.store);
    let transport = Arc::downgrade(&transport);
    let mut changes = server.store.membership_changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let (Some(store), Some(transport)) = (store.upgrade(), transport.upgrade()) else {
                return;
            };
            let table = store.members();
            // A member that joined has no table until the leader's log or snapshot gives it
            // one: keep the peers it joined with meanwhile.
            if table.is_empty() {
                continue;
            }
            if let Err(e) = transport.set_peers(peer_map(&table)) {
                tracing::warn!(error = %e, "cannot update the peers from the member table");
            }
        }
    });
}

/// On the leader, every second: the lowest durable index among the data members (this one
/// and every other that is not a witness), announced to peers so that a witness can trim its
/// log up to it; 0 (unknown) elsewhere, or while a data member has not announced its own.
fn spawn_data_durable_announcer<E: Engine>(
    server: &Arc<EtcdServer<E>>,
    transport: &Arc<PeerTransport>,
    versions: PeerVersions,
) {
    let server = Arc::downgrade(server);
    let own = transport.durable_index_cell();
    let cell = transport.data_durable_index_cell();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(server) = server.upgrade() else {
                return;
            };
            let me = server.cluster.member_id;
            let lowest = if server.raft.status().is_leader {
                server
                    .store
                    .members()
                    .keys()
                    .filter(|&&id| id != me && !versions.is_witness(id))
                    .map(|&id| versions.durable_index(id))
                    .try_fold(own.load(std::sync::atomic::Ordering::Acquire), |low, d| {
                        d.map(|d| low.min(d))
                    })
                    .unwrap_or(0)
            } else {
                0
            };
            cell.store(lowest, std::sync::atomic::Ordering::Release);
        }
    });
}

/// What the peer `Members` RPC answers: the cluster id and the member table.
fn members_source<E: Engine>(server: &Arc<EtcdServer<E>>) -> metastore_transport::MembersSource {
    let server = Arc::downgrade(server);
    Arc::new(move || {
        let Some(server) = server.upgrade() else {
            return MembersResponse::default();
        };
        MembersResponse {
            cluster_id: server.cluster.cluster_id,
            members: server
                .member_list()
                .into_iter()
                .map(|m| PeerMember {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_ur_ls,
                    client_urls: m.client_ur_ls,
                    is_learner: m.is_learner,
                })
                .collect(),
        }
    })
}

/// How long listeners get to finish what is in flight when the member stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves clients until `shutdown` resolves, then stops raft cleanly.
pub async fn serve<E: Engine>(
    member: Member<E>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let tls = if member
        .config
        .client_listeners()?
        .iter()
        .any(|(_, tls)| *tls)
    {
        Some(Arc::new(tls::Reloading::new(member.config.tls.clone())?))
    } else {
        None
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut peer_tasks = Vec::new();
    // Peers first: replaying the log needs nobody, but the other members may need this one
    // to elect a leader meanwhile. Served by a single member too, so that it can grow.
    {
        for listener in member.config.peer_listeners()? {
            let service = PeerService::new(
                member.server.cluster.cluster_id,
                member.server.cluster.member_id,
                member.server.raft.clone(),
                member.peer_versions.clone(),
                members_source(&member.server),
                {
                    // Weak: the peer service may be dropped after the server at exit.
                    let store = Arc::downgrade(&member.server.store);
                    Arc::new(move |id| store.upgrade().is_some_and(|s| s.is_removed(id)))
                },
            );
            peer_tasks.push(listen::serve_peers(
                listener,
                &member.config,
                service,
                stop_rx.clone(),
            )?);
        }
    }
    // Serve nothing older than what was acknowledged before a restart.
    let started = std::time::Instant::now();
    {
        // A replay that does not end is a bug; say where it stands instead of waiting in
        // silence (a CI run once saw a restarted member stop here).
        let replay = member.server.raft.wait_replayed();
        tokio::pin!(replay);
        loop {
            tokio::select! {
                done = &mut replay => break done?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!(
                    target_index = member.server.raft.replay_target(),
                    status = ?member.server.raft.status(),
                    "still replaying the log"
                ),
            }
        }
    }
    member.server.wait_for_own_membership().await;
    tracing::info!(
        applied = member.server.raft.status().applied_index,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "log replayed"
    );
    listen::serve_clients(&member, tls, &stop_rx, &mut tasks).await?;
    for addr in member.config.metrics_addrs()? {
        let routes =
            tonic::service::Routes::from(metastore_api::http::http_routes(member.server.clone()));
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)
            .map_err(|e| ServerError::Bind(addr, e))?;
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| ServerError::Serve(addr, e))
        }));
        tracing::info!(%addr, "ready to serve /metrics");
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
            tokio::time::sleep(Duration::from_millis(200)).await;
            if raft.is_removed() {
                return true;
            }
            if raft.is_stopped() {
                return false;
            }
        }
    };
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown => {
            tracing::info!("shutting down");
            // A rolling restart must not wait an election timeout for every leader it stops.
            member.server.hand_off_leadership().await;
        }
        removed = watchdog => {
            if removed {
                // As etcd: a removed member stops, and exits cleanly (its supervisor must not
                // bring it back).
                tracing::warn!("the member has been permanently removed from the cluster; shutting down");
            } else {
                tracing::error!("raft member stopped; shutting down");
                result = Err(ServerError::MemberStopped(format!("{:?}", member.server.raft.status())));
            }
        }
    }
    drop(member.transport);
    member
        .server
        .grpc_health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    // Client listeners finish the requests in flight (a stream still open after a grace
    // period is cut); the peer listener serves meanwhile, since a forwarded write completes
    // only once the leader's entries reach this member. Then the peer listener goes at once:
    // a peer's raft stream never ends on its own (the peer keeps it open while this member is
    // in its table), and raft loses nothing by a message cut short.
    let grace = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for mut t in tasks {
        match tokio::time::timeout_at(grace, &mut t).await {
            Ok(Ok(Err(e))) => result = Err(e),
            Ok(_) => {}
            Err(_) => t.abort(),
        }
    }
    for t in peer_tasks {
        t.abort();
    }
    let raft = member.server.raft.clone();
    let _ = tokio::task::spawn_blocking(move || raft.shutdown()).await;
    result
}
