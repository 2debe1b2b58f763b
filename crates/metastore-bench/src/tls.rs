//! TLS to the server under test, for the auth/TLS cost cases: a tonic channel over rustls
//! (ring), handed to etcd-client as a raw channel. etcd-client's own `tls` feature would turn
//! on tonic's TLS for the whole workspace build, which changes how tonic treats `https://`
//! URIs in the server's own connectors.

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Channel, Endpoint};

/// A lazily connected channel to `host:port` over TLS.
pub fn channel(
    endpoint: &str,
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Channel> {
    let hostport = endpoint
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string();
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c.context("CA certificate")?)?;
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .context("client certificate")?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key).context("client key")?;
            builder.with_client_auth_cert(certs, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| hostport.clone());
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (config, hostport, host) = (config.clone(), hostport.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&hostport).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(Endpoint::from_shared(format!(
        "http://{}",
        endpoint
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    ))?
    .tcp_nodelay(true)
    .connect_with_connector_lazy(connector))
}
