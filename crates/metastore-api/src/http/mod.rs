//! The plain HTTP endpoints etcd serves on its client port beside gRPC: `/health`, `/livez`,
//! `/readyz`, `/version` and `/metrics`. They share the client listener (HTTP/1.1 and h2c), as
//! in etcd, so probes and scrapers need no extra port; `--listen-metrics-urls` serves the same
//! routes on ports of their own.

mod health;

use crate::EtcdServer;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http::{header, Method, StatusCode, Uri};
use metastore_engine::Engine;
use std::sync::Arc;

use crate::ETCD_API_VERSION;

/// The HTTP routes of a data member's client port (and of a metrics listener).
pub fn http_routes<E: Engine>(server: Arc<EtcdServer<E>>) -> axum::Router {
    let mut router = axum::Router::new();
    {
        let server = server.clone();
        router = router.route(
            "/health",
            any(move |method: Method, uri: Uri| health::health(server.clone(), method, uri)),
        );
    }
    for (kind, registry) in [
        ("livez", health::LIVEZ_CHECKS),
        ("readyz", health::READYZ_CHECKS),
    ] {
        let root = server.clone();
        router = router.route(
            &format!("/{kind}"),
            any(move |method: Method, uri: Uri| {
                health::checks(root.clone(), kind, registry, None, method, uri)
            }),
        );
        for &check in registry {
            let server = server.clone();
            router = router.route(
                &format!("/{kind}/{check}"),
                any(move |method: Method, uri: Uri| {
                    health::checks(server.clone(), kind, registry, Some(check), method, uri)
                }),
            );
        }
    }
    {
        let server = server.clone();
        router = router.route(
            "/version",
            any(move |method: Method| version(server.clone(), method)),
        );
    }
    router = router.route(
        "/metrics",
        any(move |method: Method| {
            let server = server.clone();
            async move {
                if method != Method::GET {
                    return method_not_allowed();
                }
                match crate::observe::render(&server) {
                    Some(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    None => go_http_error(StatusCode::NOT_FOUND, "404 page not found"),
                }
            }
        }),
    );
    router
}

/// `/version`: etcd's `{"etcdserver":..,"etcdcluster":..}` (the cluster's is `not_decided`
/// until the leader has settled the members' common version), and MetaStore's own.
async fn version<E: Engine>(server: Arc<EtcdServer<E>>, method: Method) -> Response {
    if method != Method::GET {
        return method_not_allowed();
    }
    let cluster = if server.store.cluster_version().is_some() {
        ETCD_API_VERSION
    } else {
        "not_decided"
    };
    let body = serde_json::json!({
        "etcdserver": ETCD_API_VERSION,
        "etcdcluster": cluster,
        "metastore": env!("CARGO_PKG_VERSION"),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// etcd's `--cors`: the origins whose browsers may call the HTTP endpoints and the gateway
/// (`*`, etcd's default, allows any).
#[derive(Clone, Debug)]
pub struct Cors {
    origins: Arc<Vec<String>>,
}

impl Cors {
    /// A comma-separated list of origins, as etcd's flag takes it.
    pub fn new(list: &str) -> Self {
        let origins = list
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(String::from)
            .collect();
        Self {
            origins: Arc::new(origins),
        }
    }

    fn allowed(&self, origin: Option<&str>) -> Option<String> {
        if self.origins.iter().any(|o| o == "*") {
            return Some("*".to_string());
        }
        let origin = origin?;
        self.origins
            .iter()
            .any(|o| o == origin)
            .then(|| origin.to_string())
    }
}

impl Default for Cors {
    fn default() -> Self {
        Self::new("*")
    }
}

/// etcd's CORS handling of every plain HTTP request: the allow headers for an allowed origin,
/// and an empty 200 for a preflight `OPTIONS`.
pub(crate) async fn cors(
    axum::extract::State(cors): axum::extract::State<Cors>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed = cors.allowed(origin.as_deref());
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    if preflight {
        response.headers_mut().remove(header::ALLOW);
    }
    if let Some(origin) = allowed.and_then(|o| http::HeaderValue::from_str(&o).ok()) {
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            http::HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
        );
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            http::HeaderValue::from_static("accept, content-type, authorization"),
        );
    }
    response
}

/// Go's `http.Error`: plain text, `nosniff`, the message and a newline.
fn go_http_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        format!("{message}\n"),
    )
        .into_response()
}

/// What etcd's handlers answer a method other than GET.
fn method_not_allowed() -> Response {
    let mut response = go_http_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static("GET"));
    response
}

/// The query's `key=value` pairs, percent-decoded (`+` as a space), in order; a key without
/// `=` has an empty value.
fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_decode_and_keep_order() {
        let uri: Uri = "/health?exclude=NOSPACE&exclude=&serializable=true&verbose&x=a%20b+c%2"
            .parse()
            .expect("a valid URI");
        assert_eq!(
            query_pairs(&uri),
            [
                ("exclude".into(), "NOSPACE".into()),
                ("exclude".into(), "".into()),
                ("serializable".into(), "true".into()),
                ("verbose".into(), "".into()),
                ("x".into(), "a b c%2".into()),
            ]
        );
    }
}
