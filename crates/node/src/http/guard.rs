//! Every route's guard: who the caller is (a token, a dashboard session,
//! or the Unix socket's peer), whether its role may call this route
//! (401 / 403 otherwise), and one audit row for every request that may
//! change something — never with its body or a secret.

use std::net::SocketAddr;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use quetzal_api::Role;

use super::{ApiError, AppState};
use crate::node::access::{Caller, Denied};
use crate::store::AuditRecord;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the dashboard's files, its login and logout.
    Open,
    /// A caller with at least this role.
    Needs(Role),
}

/// The Unix socket's peer, by its credentials.
#[derive(Clone, Copy, Debug)]
pub struct UnixPeer {
    pub uid: Option<u32>,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for UnixPeer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        UnixPeer {
            uid: stream.io().peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}

/// Where a request came from, for the login limits and the audit log.
fn source(request: &Request) -> String {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        return peer.ip().to_string();
    }
    match request.extensions().get::<ConnectInfo<UnixPeer>>() {
        Some(ConnectInfo(UnixPeer { uid: Some(uid) })) => format!("unix (uid {uid})"),
        _ => "unix".to_owned(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
}

pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == super::web::COOKIE)
        .map(|(_, value)| value)
}

/// Who sent a request on the TCP listener. A bearer token decides alone
/// (a wrong one is not rescued by a cookie).
fn caller(app: &AppState, headers: &HeaderMap, now: i64) -> Result<Caller, Denied> {
    let access = app.node.access();
    if let Some(secret) = bearer(headers) {
        return access.authenticate(secret.trim(), now);
    }
    match session_cookie(headers) {
        Some(cookie) => access.session(cookie, now),
        None => Err(Denied::NoCredentials),
    }
}

/// Whether a request to a route with `access` is written to the audit
/// log: everything that is not a read, and the consoles and screens
/// (reads that hand over control).
fn audited(method: &Method, access: Access) -> bool {
    let read = matches!(*method, Method::GET | Method::HEAD);
    !read || access == Access::Needs(Role::Operator)
}

pub async fn guard(
    State((app, access)): State<(AppState, Access)>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let source = source(&request);
    let now = crate::store::now_millis();
    let caller = if app.tcp {
        caller(&app, request.headers(), now)
    } else {
        Ok(Caller::local())
    };
    let response = match (&caller, access) {
        (_, Access::Open) => {
            if let Ok(caller) = &caller {
                request.extensions_mut().insert(caller.clone());
            }
            next.run(request).await
        }
        (Err(denied), Access::Needs(_)) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", denied.to_string())
                .into_response()
        }
        (Ok(caller), Access::Needs(role)) if caller.role < role => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the token {} is a {}; {} {} needs the {role} role",
                caller.who, caller.role, method, path
            ),
        )
        .into_response(),
        (Ok(caller), Access::Needs(_)) => {
            request.extensions_mut().insert(caller.clone());
            next.run(request).await
        }
    };
    if audited(&method, access) {
        // A login says who logged in on its answer.
        let who = response
            .extensions()
            .get::<Caller>()
            .or(caller.as_ref().ok())
            .map_or_else(|| "-".to_owned(), |caller| caller.who.clone());
        app.node.access().record(&AuditRecord {
            at: now,
            who,
            source,
            method: method.to_string(),
            path,
            status: response.status().as_u16(),
        });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_down_changes_and_consoles_not_reads() {
        let viewer = Access::Needs(Role::Viewer);
        let operator = Access::Needs(Role::Operator);
        assert!(audited(&Method::POST, viewer));
        assert!(audited(&Method::DELETE, Access::Open));
        assert!(audited(&Method::GET, operator), "a console");
        assert!(!audited(&Method::GET, viewer));
        assert!(
            !audited(&Method::GET, Access::Needs(Role::Admin)),
            "reading the audit log"
        );
    }
}
