//! `/api/v1/tokens` and `/api/v1/audit`: who may use the API, and what
//! they did. Admin only (the route table says so).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use quetzal_api::{AuditEntry, CreateToken, CreatedToken, ErrorBody, Token};
use serde::Deserialize;

use super::{ApiError, AppState, Body, Path, Query};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct TokenPath {
    /// The token's name.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    pub name: String,
}

/// The tokens: names, roles, when made, last used and expiring — never
/// their secrets.
#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, body = Vec<Token>), (status = 403, body = ErrorBody)))]
pub(super) async fn list_tokens(State(app): State<AppState>) -> Json<Vec<Token>> {
    Json(app.node.access().tokens())
}

/// Make a token; its secret is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_token(
    State(app): State<AppState>,
    Body(request): Body<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let now = crate::store::now_millis();
    let created = app.node.access().create_token(request, now)?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Revoke a token: it and the dashboard sessions opened with it stop
/// working at once.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", params(TokenPath),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(app): State<AppState>,
    Path(TokenPath { name }): Path<TokenPath>,
) -> Result<StatusCode, ApiError> {
    app.node.access().revoke(&name, app.node.data_dir())?;
    Ok(StatusCode::NO_CONTENT)
}

/// How long a follower may wait at most.
const MAX_WAIT_SECS: u64 = 60;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Only rows after this id.
    #[serde(default)]
    #[param(minimum = 0)]
    after: i64,
    /// At most this many rows (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Wait this long (seconds, at most 60) for a row when there is none
    /// after `after` yet.
    #[param(minimum = 0, maximum = 60)]
    wait_secs: Option<u64>,
}

/// The audit log, oldest first: every mutating request (and every console
/// or screen opened) with who, from where, what and the answer's status.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery),
    responses((status = 200, body = Vec<AuditEntry>), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(super) async fn audit(
    State(app): State<AppState>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let invalid =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message);
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid(format!("limit must be 1 to 1000, not {limit}")));
    }
    let wait = query.wait_secs.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(invalid(format!(
            "wait_secs must be at most {MAX_WAIT_SECS}, not {wait}"
        )));
    }
    let rows = app
        .node
        .access()
        .audit(query.after, limit, Duration::from_secs(wait))
        .await?;
    Ok(Json(rows))
}
