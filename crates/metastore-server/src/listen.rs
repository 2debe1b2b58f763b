//! The listeners: the peer port (plain or TLS), and the client ports (plain or TLS) with the
//! JSON gateway's in-process way to the services.

use crate::config::Config;
use crate::{tls, Member, ServerError};
use metastore_engine::Engine;
use metastore_transport::PeerService;
use std::sync::Arc;
use std::time::Duration;

type Task = tokio::task::JoinHandle<Result<(), ServerError>>;

/// Serves the peer service on `addr` until `stop` turns true. Binds here, not in the task: a
/// port that cannot be bound stops the member with an error.
pub(crate) fn serve_peers(
    (addr, https): (std::net::SocketAddr, bool),
    cfg: &Config,
    service: PeerService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<(), ServerError>>, ServerError> {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service.into_server());
    if https {
        let tls = Arc::new(tls::Reloading::new(cfg.peer_tls.as_tls())?);
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| ServerError::Bind(addr, e))?;
        let incoming = tls::incoming(listener, tls, true);
        tracing::info!(%addr, "ready to serve peer traffic over TLS");
        return Ok(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(|e| ServerError::Serve(addr, e))
        }));
    }
    let incoming = tonic::transport::server::TcpIncoming::bind(addr)
        .map_err(|e| ServerError::Bind(addr, e))?
        .with_nodelay(Some(true));
    tracing::info!(%addr, "ready to serve peer traffic");
    Ok(tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ServerError::Serve(addr, e))
    }))
}

/// Binds every client URL (TLS for `https://` ones) and serves the routes there until `stop`;
/// the tasks go to `tasks`. Binding happens here, not in the tasks: a port that cannot be
/// bound stops the member with an error, not a member running "ready" without a listener.
pub(crate) async fn serve_clients<E: Engine>(
    member: &Member<E>,
    tls: Option<Arc<tls::Reloading>>,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut Vec<Task>,
) -> Result<(), ServerError> {
    let listeners = member.config.client_listeners()?;
    let grpc = &member.config.grpc;
    let builder = || {
        let builder = tonic::transport::Server::builder()
            // HTTP/1.1 beside h2 on the one port, as Go's server: curl, probes and scrapers.
            .accept_http1(true)
            .tcp_nodelay(grpc.tcp_nodelay)
            .max_concurrent_streams(grpc.max_concurrent_streams)
            .initial_stream_window_size(grpc.initial_stream_window_size)
            .initial_connection_window_size(grpc.initial_connection_window_size)
            .http2_keepalive_interval(Some(Duration::from_millis(grpc.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(grpc.keepalive_timeout_ms)));
        builder.layer(tower::util::MapResponseLayer::new(
            metastore_api::errors::grpc_go_size_error::<tonic::body::Body>,
        ))
    };
    // The JSON gateway's way to the services: in memory, whatever the listeners speak.
    let (gateway, gateway_conns) = metastore_api::gateway::in_process_channel();
    {
        let router = builder().add_routes(metastore_api::routes(
            member.server.clone(),
            gateway.clone(),
        ));
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(gateway_conns, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| ServerError::Serve(([127, 0, 0, 1], 0).into(), e))
        }));
    }
    for (addr, https) in listeners {
        let routes = metastore_api::routes(member.server.clone(), gateway.clone());
        let mut stop = stop_rx.clone();
        let router = builder().add_routes(routes);
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        // Bind here, not inside the task: a port that cannot be bound must stop the member
        // with an error, not leave it running and "ready" without a listener.
        match &tls {
            Some(tls) if https => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| ServerError::Bind(addr, e))?;
                let incoming = tls::incoming(listener, tls.clone(), grpc.tcp_nodelay);
                tasks.push(tokio::spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, shutdown)
                        .await
                        .map_err(|e| ServerError::Serve(addr, e))
                }));
                tracing::info!(%addr, "ready to serve client requests over TLS");
            }
            _ => {
                let incoming = tonic::transport::server::TcpIncoming::bind(addr)
                    .map_err(|e| ServerError::Bind(addr, e))?
                    .with_nodelay(Some(grpc.tcp_nodelay));
                tasks.push(tokio::spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, shutdown)
                        .await
                        .map_err(|e| ServerError::Serve(addr, e))
                }));
                tracing::info!(%addr, "ready to serve client requests");
            }
        }
    }
    Ok(())
}
