//! Dialing other members over TLS: the seams `metastore_api::forward::ClientDialer` (client
//! URLs) and `metastore_transport::PeerDialer` (peer URLs), implemented with rustls.

use super::{read, ClientTls, TlsError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Dials other members' `https://` URLs: their client URLs (forwarded lease keep-alives and
/// membership changes) with the client-side settings, their peer URLs with the peer ones;
/// it trusts the trusted CA file and presents this member's own certificate, as etcd's
/// members do towards each other. Files are read per dial, so a rotation
/// is picked up by the next leader connection.
pub struct TlsDialer {
    pub settings: ClientTls,
}

impl TlsDialer {
    fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let s = &self.settings;
        if s.trusted_ca_file.is_empty() {
            return Err(TlsError::Config(
                "reaching another member's https:// URL needs a trusted CA file (--trusted-ca-file, --peer-trusted-ca-file)".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read(&s.trusted_ca_file)?) {
            let cert =
                cert.map_err(|e| TlsError::Read(s.trusted_ca_file.clone().into(), e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Read(s.trusted_ca_file.clone().into(), e.to_string()))?;
        }
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let certs = CertificateDer::pem_slice_iter(&read(&s.cert_file)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Read(s.cert_file.clone().into(), e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&s.key_file)?)
            .map_err(|e| TlsError::Read(s.key_file.clone().into(), e.to_string()))?;
        let mut config = builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl TlsDialer {
    /// Connects TCP, then TLS, to the URI's host and port.
    fn connector(
        &self,
    ) -> impl tower::Service<
        tonic::codegen::http::Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = io::Error,
        Future = impl std::future::Future<
            Output = io::Result<
                hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
            >,
        > + Send,
    > + Send
           + 'static {
        let config = self.client_config().map(Arc::new);
        tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let config = config.clone();
            async move {
                let config = config.map_err(io::Error::other)?;
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let name =
                    rustls::pki_types::ServerName::try_from(host).map_err(io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })
    }
}

impl metastore_api::forward::ClientDialer for TlsDialer {
    fn dial(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        if endpoint.uri().scheme_str() != Some("https") {
            return endpoint.connect_lazy();
        }
        endpoint.connect_with_connector_lazy(self.connector())
    }
}

impl metastore_transport::PeerDialer for TlsDialer {
    fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tonic::transport::Channel, tonic::transport::Error>,
                > + Send,
        >,
    > {
        if endpoint.uri().scheme_str() != Some("https") {
            return Box::pin(async move { endpoint.connect().await });
        }
        let connector = self.connector();
        Box::pin(async move { endpoint.connect_with_connector(connector).await })
    }
}
