//! What every request passes before a handler sees it, cheapest check first: the size of
//! its URI and headers, its `Host` (DNS rebinding), its `Origin` (CORS), its API key, its
//! `Content-Type`, and its body, read under a size limit and a deadline. Every refusal is an
//! OpenAI-shaped JSON error.

use crate::api::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

/// Longest request target accepted (as nginx's default large header buffer).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header bytes accepted, names and values together.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Who may call the server, from where, and how much they may send.
#[derive(Debug, Clone)]
pub struct Access {
    /// Bearer tokens accepted on `/v1/*`; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Origins whose browser pages may call the server (`*` for any); empty allows none.
    pub cors_origins: Vec<String>,
    /// Host names (without port) requests may be addressed to; `None` allows any.
    pub allowed_hosts: Option<Vec<String>>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body.
    pub body_timeout: Duration,
}

impl Access {
    /// Loopback names, the default Host allow-list of a server bound to loopback.
    pub fn loopback_hosts() -> Vec<String> {
        ["localhost", "127.0.0.1", "[::1]"]
            .map(str::to_string)
            .to_vec()
    }
}

/// The middleware: refuses what fails a check, reads the body, and adds CORS headers to the
/// answer of an allowed cross-origin request.
pub async fn check(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(e) = check_head(&access, &parts.method, &parts.uri, &parts.headers) {
        return e.into_response();
    }
    // From here on an allowed origin's page can read every answer, refusals included.
    let cors = |response: Response| match allowed_origin(&access, &parts.headers) {
        Some(origin) => with_cors(response, &origin, None),
        None => response,
    };
    if parts.method == Method::OPTIONS {
        if let Some(origin) = allowed_origin(&access, &parts.headers) {
            let asked = parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
            return with_cors(StatusCode::NO_CONTENT.into_response(), &origin, Some(asked));
        }
    }
    if let Err(e) = authorize(&access, parts.uri.path(), &parts.headers) {
        return cors(e.into_response());
    }
    let body = if parts.method == Method::POST {
        match read_body(&access, &parts.headers, body).await {
            Ok(bytes) => Body::from(bytes),
            Err(e) => return cors(e.into_response()),
        }
    } else {
        body
    };
    let headers = parts.headers.clone();
    let response = next.run(Request::from_parts(parts, body)).await;
    match allowed_origin(&access, &headers) {
        Some(origin) => with_cors(response, &origin, None),
        None => response,
    }
}

/// Size limits, Host and Origin: everything decided from the request line and headers.
fn check_head(
    access: &Access,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let uri_bytes = uri.to_string().len();
    if uri_bytes > MAX_URI_BYTES {
        return Err(ApiError::invalid(
            None,
            format!("the request URI is {uri_bytes} bytes; at most {MAX_URI_BYTES} are accepted"),
        )
        .with_code(414, "uri_too_long"));
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::invalid(
            None,
            format!("the request headers are {header_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        )
        .with_code(431, "headers_too_large"));
    }
    if let (Some(allowed), Some(host)) = (&access.allowed_hosts, headers.get(header::HOST)) {
        let host = host.to_str().unwrap_or_default();
        let allowed_name = |a: &String| match (host_name(host), host_name(a)) {
            (Some(name), Some(ours)) => name.eq_ignore_ascii_case(ours),
            _ => false,
        };
        if !allowed.iter().any(allowed_name) {
            return Err(ApiError::invalid(
                None,
                format!("this server does not answer requests addressed to `{host}` (its Host allow-list; it guards against DNS rebinding)"),
            )
            .with_code(403, "host_not_allowed"));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if allowed_origin(access, headers).is_none() {
            let origin = origin.to_str().unwrap_or("?");
            let preflight = if method == Method::OPTIONS {
                " (CORS preflight)"
            } else {
                ""
            };
            return Err(ApiError::invalid(
                None,
                format!("cross-origin requests from `{origin}`{preflight} are not allowed by this server's CORS settings"),
            )
            .with_code(403, "origin_not_allowed"));
        }
    }
    Ok(())
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`; `None` for what is not a
/// host with an optional port.
fn host_name(host: &str) -> Option<&str> {
    let port_ok = |port: &str| port.is_empty() || port.bytes().all(|b| b.is_ascii_digit());
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(port) if !port.is_empty() => port,
            None if rest.is_empty() => "",
            _ => return None,
        };
        return port_ok(port).then_some(&host[..=end]);
    }
    match host.split_once(':') {
        Some((name, port)) if !port.is_empty() && port_ok(port) => Some(name),
        Some(_) => None,
        None => Some(host),
    }
}

/// The request's `Origin` when the CORS settings allow it.
fn allowed_origin(access: &Access, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    let allowed = access
        .cors_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(text));
    allowed.then(|| origin.clone())
}

/// Adds CORS headers for an allowed `origin`; for a preflight (`Some`), also the methods and
/// the request headers it asked for (SDKs send their own, e.g. `x-stainless-*`).
fn with_cors(
    mut response: Response,
    origin: &HeaderValue,
    preflight: Option<Option<&HeaderValue>>,
) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After"),
    );
    if let Some(asked) = preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked
                .cloned()
                .unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

/// With API keys set, every endpoint needs `Authorization: Bearer KEY` but `/health` and
/// `/metrics`, which stay open for probes and scrapers (as in vLLM and llama-server).
fn authorize(access: &Access, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if access.api_keys.is_empty() || matches!(path, "/health" | "/metrics") {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let message = match given {
        None => "no API key was given: send it as `Authorization: Bearer KEY`",
        Some(key) if access.api_keys.iter().any(|k| same_secret(k, key)) => return Ok(()),
        Some(_) => "the API key is not valid for this server",
    };
    Err(ApiError::invalid(None, message).with_code(401, "invalid_api_key"))
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

/// A POST body: JSON only, within the size limit, within the deadline.
async fn read_body(
    access: &Access,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        let shown = if content_type.is_empty() {
            "none".to_string()
        } else {
            format!("`{content_type}`")
        };
        return Err(ApiError::invalid(
            None,
            format!("the request's Content-Type is {shown}: send the JSON body as `Content-Type: application/json`"),
        )
        .with_code(415, "unsupported_media_type"));
    }
    let limit = access.max_body_bytes;
    let too_large = |size: String| {
        ApiError::invalid(
            None,
            format!("the request body is {size} bytes; this server accepts at most {limit}"),
        )
        .with_code(413, "body_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = declared.filter(|&n| n > limit) {
        return Err(too_large(length.to_string()));
    }
    match tokio::time::timeout(access.body_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let length_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"));
            if length_limit || e.to_string().contains("length limit") {
                Err(too_large(format!("more than {limit}")))
            } else {
                Err(ApiError::invalid(
                    None,
                    format!("the request body could not be read: {e}"),
                ))
            }
        }
        Err(_) => Err(ApiError::invalid(
            None,
            format!(
                "the request body did not arrive within {} seconds",
                access.body_timeout.as_secs_f64()
            ),
        )
        .with_code(408, "request_timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_drop_their_port_and_secrets_compare_whole() {
        assert_eq!(host_name("localhost:8080"), Some("localhost"));
        assert_eq!(host_name("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_name("[::1]"), Some("[::1]"));
        assert_eq!(host_name("example.com"), Some("example.com"));
        for bad in ["[::1]evil.com", "[::1]:80x", "a:b:c", "host:"] {
            assert_eq!(host_name(bad), None, "{bad}");
        }
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
