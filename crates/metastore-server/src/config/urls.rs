//! URL flags: `http://` everywhere, `https://` on client URLs (TLS, see `crate::tls`).

use super::ConfigError;
use std::net::{SocketAddr, ToSocketAddrs};

pub(super) fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

pub(super) fn parse_url(url: &str) -> Result<SocketAddr, ConfigError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ConfigError::Url(
            url.into(),
            "only http:// URLs are supported here (TLS is served on client URLs only)".into(),
        )
    })?;
    host_port(url, rest)
}

/// A client URL: its address, and whether it is `https://`.
pub(super) fn parse_client_url(url: &str) -> Result<(SocketAddr, bool), ConfigError> {
    match url.strip_prefix("https://") {
        Some(rest) => Ok((host_port(url, rest)?, true)),
        None => Ok((parse_url(url)?, false)),
    }
}

fn host_port(url: &str, rest: &str) -> Result<SocketAddr, ConfigError> {
    let hostport = rest.trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .map_err(|e| ConfigError::Url(url.into(), e.to_string()))?
        .next()
        .ok_or_else(|| ConfigError::Url(url.into(), "resolves to no address".into()))
}
