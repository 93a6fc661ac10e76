//! The dashboard: its files (embedded at build time from `web/dist`) and
//! its login, which trades the API token for a session cookie.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quetzal_api::Login;

use super::{ApiError, Body};
use crate::ratelimit::{Limiter, Verdict};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// The cookie a dashboard session lives in.
pub const COOKIE: &str = "quetzal_session";

/// How long a dashboard session lasts unused.
pub const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);
/// How many sessions are kept at most: past it, the one unused longest
/// goes.
const MAX_SESSIONS: usize = 1024;
/// How many logins one client address may try per minute.
pub const LOGINS_PER_MINUTE: u32 = 30;
/// How many client addresses the login limits remember before they forget
/// the idle ones.
const LOGIN_CLIENTS: usize = 4096;

/// The TCP listener's credentials: the API token, and the sessions
/// logged in with it (kept in memory: a daemon restart logs people out),
/// and how often each client address tried to log in.
#[derive(Debug)]
pub struct Auth {
    token: String,
    /// Each session, with when it was last used.
    sessions: Mutex<HashMap<String, Instant>>,
    logins: Mutex<HashMap<IpAddr, Limiter>>,
}

impl Auth {
    pub fn new(token: String) -> Self {
        Auth {
            token,
            sessions: Mutex::default(),
            logins: Mutex::default(),
        }
    }

    /// Whether `client` may try another login now.
    fn may_log_in(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let mut logins = self
            .logins
            .lock()
            .expect("never poisoned: no panics while held");
        if logins.len() >= LOGIN_CLIENTS {
            logins.retain(|_, limiter| !limiter.is_idle(now));
        }
        let verdict = logins
            .entry(client)
            .or_insert_with(|| Limiter::new(LOGINS_PER_MINUTE, Duration::from_secs(60)))
            .admit(now);
        matches!(verdict, Verdict::Log { .. })
    }

    /// Whether a request carries the token or a live session.
    pub fn admits(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if let Some(presented) = bearer {
            return if crate::token::matches(presented, &self.token) {
                Ok(())
            } else {
                Err("wrong token")
            };
        }
        match session_cookie(headers) {
            Some(session) if self.live(session) => Ok(()),
            Some(_) => Err("the session has ended; log in again"),
            None => Err(
                "this listener needs Authorization: Bearer <token> (see `quetzal token`) or a dashboard session",
            ),
        }
    }

    fn live(&self, session: &str) -> bool {
        self.touch(session, Instant::now())
    }

    /// Whether `session` is live at `now` (used within [`SESSION_IDLE`]);
    /// a live one counts as used now, an idle one ends.
    fn touch(&self, session: &str, now: Instant) -> bool {
        let mut sessions = self
            .sessions
            .lock()
            .expect("never poisoned: no panics while held");
        match sessions.get_mut(session) {
            Some(last) if now.saturating_duration_since(*last) < SESSION_IDLE => {
                *last = now;
                true
            }
            Some(_) => {
                sessions.remove(session);
                false
            }
            None => false,
        }
    }

    /// Starts a session used at `now`.
    fn open_session(&self, session: String, now: Instant) {
        let mut sessions = self
            .sessions
            .lock()
            .expect("never poisoned: no panics while held");
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, last| now.saturating_duration_since(*last) < SESSION_IDLE);
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, last)| **last)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(session, now);
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Log in with the API token: answers with a session cookie (HttpOnly,
/// SameSite=Strict) for the dashboard. At most 30 tries a minute from one
/// client address.
#[utoipa::path(post, path = "/api/v1/session", request_body = Login,
    responses((status = 204), (status = 401, body = quetzal_api::ErrorBody),
        (status = 429, body = quetzal_api::ErrorBody)))]
pub async fn login(
    State(auth): State<Option<Arc<Auth>>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Body(login): Body<Login>,
) -> Result<Response, ApiError> {
    let Some(auth) = auth else {
        // The Unix socket: its file mode is the access control.
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if let Some(Extension(ConnectInfo(peer))) = peer
        && !auth.may_log_in(peer.ip())
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
    if !crate::token::matches(&login.token, &auth.token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong token",
        ));
    }
    let session = crate::node::random_hex(32).map_err(ApiError::from)?;
    auth.open_session(session.clone(), Instant::now());
    let cookie = format!("{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict");
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

/// Log out: the session ends and its cookie is cleared.
#[utoipa::path(delete, path = "/api/v1/session", responses((status = 204)))]
pub async fn logout(State(auth): State<Option<Arc<Auth>>>, headers: HeaderMap) -> Response {
    if let (Some(auth), Some(session)) = (auth, session_cookie(&headers)) {
        auth.sessions
            .lock()
            .expect("never poisoned: no panics while held")
            .remove(session);
    }
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
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

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn admits_the_token_or_a_live_session_only() {
        let auth = Auth::new("secret".into());
        auth.open_session("s1".into(), Instant::now());
        assert!(
            auth.admits(&headers(&[(header::AUTHORIZATION, "Bearer secret")]))
                .is_ok()
        );
        assert!(
            auth.admits(&headers(&[(header::AUTHORIZATION, "Bearer nope")]))
                .is_err()
        );
        assert!(
            auth.admits(&headers(&[(header::COOKIE, "a=b; quetzal_session=s1")]))
                .is_ok()
        );
        assert!(
            auth.admits(&headers(&[(header::COOKIE, "quetzal_session=s2")]))
                .is_err()
        );
        assert!(auth.admits(&headers(&[])).is_err());
        // A wrong bearer token is not rescued by a cookie.
        assert!(
            auth.admits(&headers(&[
                (header::AUTHORIZATION, "Bearer nope"),
                (header::COOKIE, "quetzal_session=s1")
            ]))
            .is_err()
        );
    }

    #[test]
    fn types_what_it_serves() {
        assert_eq!(
            content_type("/assets/index-abc.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("/assets/x.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/assets/x.bin"), "application/octet-stream");
    }

    #[test]
    fn a_session_ends_after_being_unused_for_eight_hours() {
        let auth = Auth::new("secret".into());
        let start = Instant::now();
        auth.open_session("s1".into(), start);

        assert!(auth.touch("s1", start + SESSION_IDLE / 2));
        // Used at half time: it lasts a whole idle time from then.
        assert!(auth.touch("s1", start + SESSION_IDLE));
        assert!(!auth.touch("s1", start + SESSION_IDLE * 2));
        assert!(!auth.touch("s1", start), "an ended session stays ended");
    }

    #[test]
    fn the_sessions_kept_are_bounded() {
        let auth = Auth::new("secret".into());
        let start = Instant::now();
        for i in 0..=MAX_SESSIONS {
            let at = start + Duration::from_secs(u64::try_from(i).unwrap());
            auth.open_session(format!("s{i}"), at);
        }
        let later = start + Duration::from_secs(2000);

        assert_eq!(auth.sessions.lock().unwrap().len(), MAX_SESSIONS);
        assert!(!auth.touch("s0", later), "the one unused longest went");
        assert!(auth.touch(&format!("s{MAX_SESSIONS}"), later));
    }
}
