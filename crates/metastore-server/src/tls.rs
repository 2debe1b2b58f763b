//! TLS on the client port, as etcd's flags set it up: an `https://` listen URL, `--cert-file`
//! and `--key-file`; `--trusted-ca-file` makes client certificates mandatory (and checked
//! against that CA, and `--client-crl-file`); `--tls-min-version`, `--tls-max-version` and
//! `--cipher-suites` narrow what is offered. ALPN offers `h2` and `http/1.1`, so gRPC and the
//! HTTP endpoints share the port as they do in plain text.
//!
//! Rotation without a restart: before a handshake the files' modification times and sizes are
//! compared (at most once a second) with the ones the current configuration was built from;
//! on a change the configuration is rebuilt, and a broken new file keeps the old one serving
//! with a warning.
//!
//! rustls with the ring provider does the TLS; x509-parser reads a client certificate's
//! common name for `--client-cert-auth`.

use metastore_api::auth::TlsClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

mod dial;
mod peer;

pub use dial::TlsDialer;
pub use peer::{PeerTls, PeerTlsFlags};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: reading {0}: {1}")]
    Read(PathBuf, String),
    #[error("TLS: {0}")]
    Config(String),
}

/// The client-side TLS settings (etcd's flag names).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "kebab-case")]
pub struct ClientTls {
    pub cert_file: String,
    pub key_file: String,
    pub trusted_ca_file: String,
    /// The client certificate's common name is the user when no token is sent.
    pub client_cert_auth: bool,
    pub client_crl_file: String,
    /// `TLS1.2` or `TLS1.3` (etcd also names 1.0 and 1.1, which rustls does not speak).
    pub tls_min_version: String,
    pub tls_max_version: String,
    /// Comma-separated IANA names, e.g. `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`.
    pub cipher_suites: String,
    /// Only client certificates with this common name get in (etcd's
    /// `--peer-cert-allowed-cn`; set for the peer port only).
    #[serde(skip)]
    pub allowed_cn: String,
}

/// The flags that set [`ClientTls`].
#[derive(clap::Args, Debug, Default)]
pub struct TlsFlags {
    /// Certificate served on `https://` client URLs.
    #[arg(long)]
    pub cert_file: Option<String>,
    /// Its private key.
    #[arg(long)]
    pub key_file: Option<String>,
    /// CA that client certificates must chain to (makes them mandatory).
    #[arg(long)]
    pub trusted_ca_file: Option<String>,
    /// Take the client certificate's common name as the user when no token is sent.
    #[arg(long)]
    pub client_cert_auth: bool,
    /// Revoked client certificates (PEM CRL).
    #[arg(long)]
    pub client_crl_file: Option<String>,
    /// Lowest TLS version offered: TLS1.2 (default) or TLS1.3.
    #[arg(long)]
    pub tls_min_version: Option<String>,
    /// Highest TLS version offered: TLS1.3 (default) or TLS1.2.
    #[arg(long)]
    pub tls_max_version: Option<String>,
    /// Cipher suites offered, comma-separated IANA names (default: rustls's).
    #[arg(long)]
    pub cipher_suites: Option<String>,
}

impl ClientTls {
    pub fn apply(&mut self, flags: TlsFlags) {
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = flags.$f { self.$f = v; })* };
        }
        set!(
            cert_file,
            key_file,
            trusted_ca_file,
            client_crl_file,
            tls_min_version,
            tls_max_version,
            cipher_suites
        );
        if flags.client_cert_auth {
            self.client_cert_auth = true;
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        [
            &self.cert_file,
            &self.key_file,
            &self.trusted_ca_file,
            &self.client_crl_file,
        ]
        .into_iter()
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .collect()
    }

    /// Checks what can be checked before serving: files given together, versions known.
    pub fn validate(&self, has_https_url: bool) -> Result<(), TlsError> {
        if has_https_url && (self.cert_file.is_empty() || self.key_file.is_empty()) {
            return Err(TlsError::Config(
                "an https:// client URL needs --cert-file and --key-file".into(),
            ));
        }
        if self.client_cert_auth && self.trusted_ca_file.is_empty() {
            return Err(TlsError::Config(
                "--client-cert-auth needs --trusted-ca-file to check client certificates".into(),
            ));
        }
        if has_https_url {
            build(self)?;
        }
        Ok(())
    }
}

pub(crate) fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read(path.into(), e.to_string()))
}

fn version(name: &str, default: &'static SupportedProtocolVersion) -> Result<u8, TlsError> {
    let v = match name {
        "" => default,
        "TLS1.2" => &rustls::version::TLS12,
        "TLS1.3" => &rustls::version::TLS13,
        "TLS1.0" | "TLS1.1" => {
            return Err(TlsError::Config(format!(
                "{name} is not offered: this server speaks TLS1.2 and TLS1.3"
            )))
        }
        other => return Err(TlsError::Config(format!("unknown TLS version {other:?}"))),
    };
    Ok(if v.version == rustls::ProtocolVersion::TLSv1_3 {
        3
    } else {
        2
    })
}

/// Builds the rustls configuration the settings describe.
pub(crate) fn build(s: &ClientTls) -> Result<ServerConfig, TlsError> {
    // rustls 0.23 marks ring's provider deprecated (no post-quantum key exchange); the
    // aws-lc-rs one needs cmake and minutes of C build on every fresh machine, for a client
    // port etcd's own clients reach with classic key exchange anyway.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    if !s.cipher_suites.is_empty() {
        let wanted: Vec<&str> = s.cipher_suites.split(',').map(str::trim).collect();
        for name in &wanted {
            if !provider
                .cipher_suites
                .iter()
                .any(|c| format!("{:?}", c.suite()) == *name)
            {
                return Err(TlsError::Config(format!("unknown cipher suite {name:?}")));
            }
        }
        provider
            .cipher_suites
            .retain(|c| wanted.contains(&format!("{:?}", c.suite()).as_str()));
    }
    let provider = Arc::new(provider);
    let (min, max) = (
        version(&s.tls_min_version, &rustls::version::TLS12)?,
        version(&s.tls_max_version, &rustls::version::TLS13)?,
    );
    if min > max {
        return Err(TlsError::Config(
            "--tls-min-version is above --tls-max-version".into(),
        ));
    }
    let versions: Vec<&'static SupportedProtocolVersion> =
        [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(n, _)| (min..=max).contains(n))
            .map(|(_, v)| v)
            .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if s.trusted_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read(&s.trusted_ca_file)?) {
            let cert =
                cert.map_err(|e| TlsError::Read(s.trusted_ca_file.clone().into(), e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Read(s.trusted_ca_file.clone().into(), e.to_string()))?;
        }
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if !s.client_crl_file.is_empty() {
            let crls = CertificateRevocationListDer::pem_slice_iter(&read(&s.client_crl_file)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Read(s.client_crl_file.clone().into(), e.to_string()))?;
            verifier = verifier.with_crls(crls);
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let certs = CertificateDer::pem_slice_iter(&read(&s.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read(s.cert_file.clone().into(), e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&s.key_file)?)
        .map_err(|e| TlsError::Read(s.key_file.clone().into(), e.to_string()))?;
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What a file looked like when the configuration was built.
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (f.clone(), meta)
        })
        .collect()
}

/// The current TLS configuration, rebuilt when its files change.
pub struct Reloading {
    settings: ClientTls,
    current: parking_lot::Mutex<(Instant, Stamp, Arc<ServerConfig>)>,
}

/// How often the files are looked at, at most.
const RECHECK: Duration = Duration::from_secs(1);

impl Reloading {
    pub fn new(settings: ClientTls) -> Result<Reloading, TlsError> {
        let files = settings.files();
        let config = Arc::new(build(&settings)?);
        Ok(Reloading {
            settings,
            current: parking_lot::Mutex::new((Instant::now(), stamp(&files), config)),
        })
    }

    fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock();
        if current.0.elapsed() < RECHECK {
            return current.2.clone();
        }
        current.0 = Instant::now();
        let now = stamp(&self.settings.files());
        if now != current.1 {
            match build(&self.settings) {
                Ok(config) => {
                    tracing::info!("TLS files changed; serving the new certificate");
                    current.2 = Arc::new(config);
                    current.1 = now;
                }
                Err(e) => {
                    // Half-written files (a certificate before its key) are normal during a
                    // rotation: keep serving the last good configuration and look again.
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                }
            }
        }
        current.2.clone()
    }
}

/// An accepted TLS connection, with who the client certificate says the client is.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    client: TlsClient,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsClient;

    fn connect_info(&self) -> TlsClient {
        self.client.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The common name of a certificate's subject.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` and hands over the ones whose handshake succeeds; each
/// handshake runs on its own task, so a slow client never holds up the others.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloading>,
    nodelay: bool,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a client connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let allowed_cn = tls.settings.allowed_cn.clone();
            let _ = tcp.set_nodelay(nodelay);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let common_name = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(common_name);
                if !allowed_cn.is_empty() && common_name.as_deref() != Some(allowed_cn.as_str()) {
                    tracing::warn!(%remote, ?common_name, %allowed_cn, "refused a peer whose certificate names another member");
                    return;
                }
                let conn = TlsConn {
                    inner: stream,
                    client: TlsClient { common_name },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(f: impl FnOnce(&mut ClientTls)) -> ClientTls {
        let mut s = ClientTls {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
            ..Default::default()
        };
        f(&mut s);
        s
    }

    fn config_error(s: &ClientTls) -> String {
        match s.validate(true) {
            Err(TlsError::Config(m)) => m,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn versions_and_suites_are_checked_before_any_file() {
        let e = config_error(&settings(|s| s.tls_min_version = "TLS1.0".into()));
        assert!(e.contains("TLS1.2 and TLS1.3"), "{e}");
        let e = config_error(&settings(|s| {
            s.tls_min_version = "TLS1.3".into();
            s.tls_max_version = "TLS1.2".into();
        }));
        assert!(e.contains("above"), "{e}");
        let e = config_error(&settings(|s| {
            s.cipher_suites = "TLS_RSA_WITH_RC4_128_MD5".into()
        }));
        assert!(e.contains("unknown cipher suite"), "{e}");
        let e = config_error(&settings(|s| {
            s.client_cert_auth = true;
        }));
        assert!(e.contains("--trusted-ca-file"), "{e}");
        assert!(matches!(
            settings(|s| s.cipher_suites = "TLS13_AES_128_GCM_SHA256".into()).validate(true),
            Err(TlsError::Read(..))
        ));
        let e = config_error(&ClientTls::default());
        assert!(e.contains("--cert-file"), "{e}");
        assert!(ClientTls::default().validate(false).is_ok());
    }
}
