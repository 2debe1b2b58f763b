//! etcd's JWT tokens (`--auth-token jwt,sign-method=ES256,pub-key=...,priv-key=...,ttl=5m`):
//! claims `username`, `revision` and `exp`, signed by the member that authenticates and
//! checked by any member holding the public key (or the shared secret for HS*). Unlike
//! simple tokens they outlive a restart and need no raft round; a token signed before an auth
//! change carries the older revision and gets `revision of auth store is old`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use metastore_mvcc::auth::AuthInfo;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The JWT settings as the flag gives them (files already read).
#[derive(Clone, Debug)]
pub struct JwtConfig {
    pub sign_method: String,
    pub public_key: Option<Vec<u8>>,
    pub private_key: Option<Vec<u8>>,
    pub ttl: Duration,
}

/// etcd's default JWT lifetime.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub(crate) struct JwtKeys {
    algorithm: Algorithm,
    signing: Option<EncodingKey>,
    verifying: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKeys({:?})", self.algorithm)
    }
}

/// etcd's sign methods (jwt-go's names).
fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        _ => return None,
    })
}

impl JwtKeys {
    /// Checks the settings as etcd does at start: a known sign method and the keys it needs.
    pub fn new(cfg: &JwtConfig) -> Result<JwtKeys, String> {
        let algorithm = algorithm(&cfg.sign_method)
            .ok_or_else(|| format!("auth: invalid auth signature method {:?}", cfg.sign_method))?;
        let bad = |e: jsonwebtoken::errors::Error| format!("auth: JWT key: {e}");
        let (signing, verifying) =
            match algorithm {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    // etcd: the HMAC secret is the priv-key file's content.
                    let secret = cfg
                        .private_key
                        .as_deref()
                        .ok_or("auth: missing key data (HS* needs priv-key)")?;
                    (
                        Some(EncodingKey::from_secret(secret)),
                        DecodingKey::from_secret(secret),
                    )
                }
                Algorithm::ES256 | Algorithm::ES384 => {
                    let public = cfg.public_key.as_deref().ok_or(
                        "auth: missing key data (every member needs pub-key to check tokens)",
                    )?;
                    let signing = match cfg.private_key.as_deref() {
                        Some(k) => Some(EncodingKey::from_ec_pem(k).map_err(bad)?),
                        None => None,
                    };
                    (signing, DecodingKey::from_ec_pem(public).map_err(bad)?)
                }
                _ => {
                    let public = cfg.public_key.as_deref().ok_or(
                        "auth: missing key data (every member needs pub-key to check tokens)",
                    )?;
                    let signing = match cfg.private_key.as_deref() {
                        Some(k) => Some(EncodingKey::from_rsa_pem(k).map_err(bad)?),
                        None => None,
                    };
                    (signing, DecodingKey::from_rsa_pem(public).map_err(bad)?)
                }
            };
        let keys = JwtKeys {
            algorithm,
            signing,
            verifying,
            ttl: cfg.ttl,
        };
        // etcd's ErrKeyMismatch: a token this member signs must be one it accepts.
        if keys.signing.is_some() {
            let probe = keys.sign("metastore-key-check", 1)?;
            if keys.verify(&probe).is_none() {
                return Err("auth: public and private keys don't match".into());
            }
        }
        Ok(keys)
    }

    /// A token for `username` at auth `revision`; etcd's ErrVerifyOnly without a private key.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, String> {
        let key = self
            .signing
            .as_ref()
            .ok_or("auth: token signing attempted with verify-only key")?;
        let exp = (SystemTime::now() + self.ttl)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| format!("auth: signing a JWT: {e}"))
    }

    /// Who a token names, if its signature, method and expiry check out.
    pub fn verify(&self, token: &str) -> Option<AuthInfo> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.verifying, &validation).ok()?;
        Some(AuthInfo {
            username: data.claims.username,
            revision: data.claims.revision,
        })
    }
}
