//! The dashboard: its files (embedded at build time from `web/dist`) and
//! its login, which trades an API token for a session cookie (kept hashed
//! in the store, see [`crate::node::access`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quetzal_api::Login;

use super::{ApiError, AppState, Body};
use crate::ratelimit::{Limiter, Verdict};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// The cookie a dashboard session lives in.
pub const COOKIE: &str = "quetzal_session";

/// How many logins one client address may try per minute.
pub const LOGINS_PER_MINUTE: u32 = 30;
/// How many client addresses the login limits remember before they forget
/// the idle ones.
const LOGIN_CLIENTS: usize = 4096;

/// How often each client address tried to log in.
#[derive(Debug, Default)]
pub struct LoginLimits {
    clients: Mutex<HashMap<IpAddr, Limiter>>,
}

impl LoginLimits {
    /// Whether `client` may try another login now.
    fn admit(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let mut clients = self
            .clients
            .lock()
            .expect("never poisoned: no panics while held");
        if clients.len() >= LOGIN_CLIENTS {
            clients.retain(|_, limiter| !limiter.is_idle(now));
        }
        let verdict = clients
            .entry(client)
            .or_insert_with(|| Limiter::new(LOGINS_PER_MINUTE, Duration::from_secs(60)))
            .admit(now);
        matches!(verdict, Verdict::Log { .. })
    }
}

/// Log in with an API token: answers with a session cookie (HttpOnly,
/// Secure, SameSite=Strict) for the dashboard, with the token's role. At
/// most 30 tries a minute from one client address.
#[utoipa::path(post, path = "/api/v1/session", request_body = Login,
    responses((status = 204), (status = 401, body = quetzal_api::ErrorBody),
        (status = 429, body = quetzal_api::ErrorBody)))]
pub async fn login(
    State(app): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Body(login): Body<Login>,
) -> Result<Response, ApiError> {
    if !app.tcp {
        // The Unix socket: its file mode is the access control.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if let Some(Extension(ConnectInfo(peer))) = peer
        && !app.logins.admit(peer.ip())
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "too many logins from {}: at most {LOGINS_PER_MINUTE} a minute; try again later",
                peer.ip()
            ),
        ));
    }
    let now = crate::store::now_millis();
    let (session, caller) =
        app.node
            .access()
            .log_in(login.token.trim(), now)
            .map_err(|denied| {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", denied.to_string())
            })?;
    // The TCP listener is HTTPS only: the cookie never travels in clear.
    let cookie = format!("{COOKIE}={session}; Path=/; HttpOnly; Secure; SameSite=Strict");
    let mut response = (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response();
    // For the audit log: who logged in.
    response.extensions_mut().insert(caller);
    Ok(response)
}

/// Log out: the session ends and its cookie is cleared.
#[utoipa::path(delete, path = "/api/v1/session", responses((status = 204)))]
pub async fn logout(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(session) = super::guard::session_cookie(&headers) {
        app.node.access().log_out(session);
    }
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

pub async fn index() -> Response {
    match find("/index.html") {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "The dashboard was not built into this quetzald: run ./scripts/setup (it builds web/ with npm, then quetzald).\n",
        )
            .into_response(),
    }
}

/// A built file; names carry a content hash, so they are cached for good.
pub async fn asset(Path(path): Path<String>) -> Response {
    let url = format!("/assets/{path}");
    match find(&url) {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(&url)),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            bytes,
        )
            .into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file").into_response(),
    }
}

fn find(url: &str) -> Option<&'static [u8]> {
    embedded::ASSETS
        .iter()
        .find(|(path, _)| *path == url)
        .map(|(_, bytes)| *bytes)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_what_it_serves() {
        assert_eq!(
            content_type("/assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("/assets/x.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/assets/x.bin"), "application/octet-stream");
    }
}
