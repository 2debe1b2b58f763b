//! The peer port's TLS settings: etcd's `--peer-*` flags, in the client port's shape for the
//! shared builders.

use super::{build, ClientTls, TlsError};
use serde::{Deserialize, Serialize};

/// The peer-side TLS settings (etcd's `--peer-*` flags); TLS is on for `https://` peer URLs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "kebab-case")]
pub struct PeerTls {
    pub peer_cert_file: String,
    pub peer_key_file: String,
    /// CA that peers' certificates must chain to (makes them mandatory).
    pub peer_trusted_ca_file: String,
    /// etcd's `--peer-client-cert-auth`: peers must present a certificate.
    pub peer_client_cert_auth: bool,
    pub peer_cert_allowed_cn: String,
    pub peer_crl_file: String,
}

/// The flags that set [`PeerTls`].
#[derive(clap::Args, Debug, Default)]
pub struct PeerTlsFlags {
    /// Certificate served on `https://` peer URLs (and shown to peers when dialing them).
    #[arg(long)]
    pub peer_cert_file: Option<String>,
    #[arg(long)]
    pub peer_key_file: Option<String>,
    /// CA that peers' certificates must chain to (makes them mandatory).
    #[arg(long)]
    pub peer_trusted_ca_file: Option<String>,
    /// Require peers to present a certificate from the peer CA.
    #[arg(long)]
    pub peer_client_cert_auth: bool,
    /// Only peers whose certificate has this common name are accepted.
    #[arg(long)]
    pub peer_cert_allowed_cn: Option<String>,
    /// Revoked peer certificates (PEM CRL).
    #[arg(long)]
    pub peer_crl_file: Option<String>,
}

impl PeerTls {
    pub fn apply(&mut self, flags: PeerTlsFlags) {
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = flags.$f { self.$f = v; })* };
        }
        set!(
            peer_cert_file,
            peer_key_file,
            peer_trusted_ca_file,
            peer_cert_allowed_cn,
            peer_crl_file
        );
        if flags.peer_client_cert_auth {
            self.peer_client_cert_auth = true;
        }
    }

    /// The same settings in the client port's shape (what the builders take).
    pub fn as_tls(&self) -> ClientTls {
        ClientTls {
            cert_file: self.peer_cert_file.clone(),
            key_file: self.peer_key_file.clone(),
            trusted_ca_file: self.peer_trusted_ca_file.clone(),
            client_cert_auth: self.peer_client_cert_auth,
            client_crl_file: self.peer_crl_file.clone(),
            allowed_cn: self.peer_cert_allowed_cn.clone(),
            ..Default::default()
        }
    }

    pub fn validate(&self, has_https_url: bool) -> Result<(), TlsError> {
        let tls = self.as_tls();
        if has_https_url && (tls.cert_file.is_empty() || tls.key_file.is_empty()) {
            return Err(TlsError::Config(
                "an https:// peer URL needs --peer-cert-file and --peer-key-file".into(),
            ));
        }
        if tls.client_cert_auth && tls.trusted_ca_file.is_empty() {
            return Err(TlsError::Config(
                "--peer-client-cert-auth needs --peer-trusted-ca-file".into(),
            ));
        }
        if has_https_url {
            build(&tls)?;
        }
        Ok(())
    }
}
