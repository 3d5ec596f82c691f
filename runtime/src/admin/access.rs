//! Who may use the admin API. Publishing and replaying act with sluice's
//! credentials on its brokers, so:
//! - with `[admin] token`, every endpoint but the probes (and `/metrics`
//!   unless `metrics_auth`) needs `Authorization: Bearer <token>`;
//! - the `Host` header must name this listener (a page that rebinds its own
//!   DNS name to 127.0.0.1 is refused);
//! - a POST without the token must carry a JSON or octet-stream body and no
//!   foreign `Origin`: a web page's no-cors `fetch()` can send neither.

use crate::config::AdminConfig;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Largest request body (a published message), in bytes.
pub const MAX_BODY: usize = 4 << 20;

/// The rules of one listener.
pub struct Access {
    token: Option<String>,
    metrics_auth: bool,
    listen: SocketAddr,
    hosts: Vec<String>,
}

impl Access {
    pub fn new(config: &AdminConfig) -> Self {
        let port = config.listen.port();
        let mut hosts = vec![config.listen.to_string()];
        if config.listen.ip().is_loopback() || config.listen.ip().is_unspecified() {
            hosts.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        }
        hosts.extend(config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Self {
            token: config.token().map(str::to_owned),
            metrics_auth: config.metrics_auth,
            listen: config.listen,
            hosts,
        }
    }

    /// Probes and (by default) metrics are open to anyone who reaches the
    /// port: they reveal no messages and change nothing.
    fn is_public(&self, path: &str) -> bool {
        matches!(path, "/healthz" | "/readyz") || (path == "/metrics" && !self.metrics_auth)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        // Listening on every interface: any address of this host, by IP.
        self.listen.ip().is_unspecified()
            && host
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.port() == self.listen.port() && !matches!(a.ip(), IpAddr::V4(ip) if ip.is_broadcast()))
    }

    fn has_token(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else { return false };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), expected.as_bytes()))
    }

    /// Why `request` is refused, if it is.
    fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
        if self.is_public(path) {
            return Ok(());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !self.host_allowed(host) {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host {:?} is not this admin API (add it to [admin] allowed_hosts)",
                    crate::headers::shown(host)
                ),
            ));
        }
        let authenticated = self.has_token(headers);
        if self.token.is_some() && !authenticated {
            return Err((
                StatusCode::UNAUTHORIZED,
                "this admin API needs `Authorization: Bearer <token>` (SLUICE_ADMIN_TOKEN for the CLI)".into(),
            ));
        }
        // A request another web site's page made (any method: a GET can
        // make the daemon scan a dead-letter queue).
        let fetched_by_another_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("cross-site") || v.eq_ignore_ascii_case("same-site"));
        let foreign_origin = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|origin| !self.host_allowed(origin.split_once("://").map_or(origin, |(_, h)| h)));
        if !authenticated && (fetched_by_another_site || foreign_origin) {
            return Err((StatusCode::FORBIDDEN, "cross-origin requests are refused".into()));
        }
        if *method != Method::GET && *method != Method::HEAD && !authenticated {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            // None of these is a type a cross-site form may send.
            if !["application/json", "application/octet-stream", "application/x-ndjson"].contains(&essence.as_str()) {
                return Err((
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "a POST needs Content-Type: application/json, application/x-ndjson or application/octet-stream"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware that applies [`Access`] to every request.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    match access.check(request.method(), request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err((status, message)) => {
            let mut response = super::error(status, message);
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            response.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, token: Option<&str>) -> Access {
        Access::new(&AdminConfig {
            listen: listen.parse().unwrap(),
            token: token.map(str::to_owned),
            ..AdminConfig::default()
        })
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts() {
        let a = access("127.0.0.1:9595", None);
        assert!(a.host_allowed("127.0.0.1:9595"));
        assert!(a.host_allowed("LOCALHOST:9595"));
        assert!(!a.host_allowed("evil.example:9595"));
        assert!(!a.host_allowed("127.0.0.1:80"));
        assert!(!a.host_allowed(""));
        let all = access("0.0.0.0:9595", Some("0123456789abcdef"));
        assert!(all.host_allowed("10.1.2.3:9595"));
        assert!(!all.host_allowed("rebound.example:9595"));
    }

    #[test]
    fn browser_style_posts_are_refused_without_a_token() {
        let a = access("127.0.0.1:9595", None);
        let post = Method::POST;
        let host = (header::HOST, "127.0.0.1:9595");
        let text = headers(&[host.clone(), (header::CONTENT_TYPE, "text/plain")]);
        assert_eq!(
            a.check(&post, "/v1/publish/x", &text).unwrap_err().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let none = headers(std::slice::from_ref(&host));
        assert!(a.check(&post, "/v1/publish/x", &none).is_err());
        let foreign = headers(&[
            host.clone(),
            (header::CONTENT_TYPE, "application/json"),
            (header::ORIGIN, "http://evil.example"),
        ]);
        assert_eq!(
            a.check(&post, "/v1/publish/x", &foreign).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let cli = headers(&[host.clone(), (header::CONTENT_TYPE, "application/octet-stream")]);
        assert!(a.check(&post, "/v1/publish/x", &cli).is_ok());
        let page_get = headers(&[host, ("sec-fetch-site".parse().unwrap(), "cross-site")]);
        assert_eq!(
            a.check(&Method::GET, "/v1/dlq", &page_get).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn token() {
        let a = access("0.0.0.0:9595", Some("0123456789abcdef"));
        let host = (header::HOST, "127.0.0.1:9595");
        let get = Method::GET;
        assert!(a.check(&get, "/healthz", &HeaderMap::new()).is_ok());
        assert!(a.check(&get, "/metrics", &HeaderMap::new()).is_ok());
        let anonymous = headers(std::slice::from_ref(&host));
        assert_eq!(
            a.check(&get, "/v1/status", &anonymous).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        let wrong = headers(&[host.clone(), (header::AUTHORIZATION, "Bearer 0123456789abcdeX")]);
        assert!(a.check(&get, "/v1/status", &wrong).is_err());
        let right = headers(&[host, (header::AUTHORIZATION, "Bearer 0123456789abcdef")]);
        assert!(a.check(&get, "/v1/status", &right).is_ok());
        // With the token a POST needs no particular content type.
        assert!(a.check(&Method::POST, "/v1/publish/x", &right).is_ok());
    }
}
