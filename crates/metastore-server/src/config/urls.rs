//! Flags with a little syntax: URLs (`http://`, or `https://` for TLS, see `crate::tls`) and
//! etcd's `--auth-token`.

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

/// etcd's `--auth-token`: `simple`, or `jwt,sign-method=ES256,pub-key=FILE,priv-key=FILE,ttl=5m`
/// (key files read here). None for simple tokens.
pub(super) fn auth_token(flag: &str) -> Result<Option<metastore_api::auth::JwtConfig>, String> {
    let mut parts = flag.split(',');
    let kind = parts.next().unwrap_or_default();
    let mut options = std::collections::HashMap::new();
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--auth-token {flag:?}: {part:?} is not key=value"))?;
        if options.insert(k, v).is_some() {
            return Err(format!("--auth-token {flag:?}: {k} given twice"));
        }
    }
    match kind {
        "simple" if options.is_empty() => Ok(None),
        "jwt" => {
            if let Some(k) = options
                .keys()
                .find(|k| !["sign-method", "pub-key", "priv-key", "ttl"].contains(k))
            {
                return Err(format!("--auth-token {flag:?}: unknown option {k:?}"));
            }
            let read = |key: &str| -> Result<Option<Vec<u8>>, String> {
                options
                    .get(key)
                    .map(|path| {
                        std::fs::read(path).map_err(|e| format!("--auth-token {key}={path}: {e}"))
                    })
                    .transpose()
            };
            let ttl = match options.get("ttl") {
                Some(t) => metastore_api::compactor::parse_go_duration(t)
                    .ok_or_else(|| format!("--auth-token ttl={t}: not a duration"))?,
                None => metastore_api::auth::DEFAULT_JWT_TTL,
            };
            Ok(Some(metastore_api::auth::JwtConfig {
                sign_method: options
                    .get("sign-method")
                    .copied()
                    .unwrap_or_default()
                    .to_string(),
                public_key: read("pub-key")?,
                private_key: read("priv-key")?,
                ttl,
            }))
        }
        _ => Err(format!(
            "--auth-token {flag:?}: `simple` or `jwt,sign-method=...,pub-key=...,priv-key=...`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_token_flags_as_etcd_reads_them() {
        assert!(auth_token("simple").expect("simple").is_none());
        assert!(auth_token("simple,ttl=5m").is_err());
        assert!(auth_token("jwt,sign-method=HS256,color=blue").is_err());
        assert!(auth_token("jwt,ttl=5m,ttl=6m").is_err());
        assert!(auth_token("jwt,priv-key=/nonexistent/key").is_err());
        assert!(auth_token("opaque").is_err());
        let jwt = auth_token("jwt,sign-method=HS256,ttl=90s")
            .expect("parses")
            .expect("jwt");
        assert_eq!(jwt.sign_method, "HS256");
        assert_eq!(jwt.ttl, std::time::Duration::from_secs(90));
        // The keys are checked when the settings are taken up: HS256 needs a secret.
        let cfg = metastore_api::AuthConfig {
            jwt: Some(jwt),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn https_only_where_tls_is_served() {
        assert!(parse_client_url("https://127.0.0.1:1").expect("https").1);
        assert!(!parse_client_url("http://127.0.0.1:1").expect("http").1);
        assert!(parse_url("https://127.0.0.1:1").is_err());
    }
}
