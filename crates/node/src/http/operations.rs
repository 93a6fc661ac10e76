//! `/api/v1/operations`: long work, read and cancelled.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use quetzal_api::{ErrorBody, Operation, OperationList, OperationResponse};
use serde::Deserialize;

use super::contract::IdPath;
use super::{ApiError, AppState, Path, Query};

/// `202 Accepted` with the operation and where to follow it.
pub(super) fn accepted(operation: Operation) -> Response {
    let location = format!("/api/v1/operations/{}", operation.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(OperationResponse { operation }),
    )
        .into_response()
}

/// Operations, newest first (the last 200).
#[utoipa::path(get, path = "/api/v1/operations",
    responses((status = 200, body = OperationList)))]
pub(super) async fn list(State(app): State<AppState>) -> Result<Json<OperationList>, ApiError> {
    Ok(Json(OperationList {
        operations: app.node.operations().list()?,
    }))
}

/// One operation.
#[utoipa::path(get, path = "/api/v1/operations/{id}", params(IdPath),
    responses((status = 200, body = OperationResponse), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(app): State<AppState>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Json<OperationResponse>, ApiError> {
    Ok(Json(OperationResponse {
        operation: app.node.operations().get(&id)?,
    }))
}

/// How long a wait may last at most, and by default.
const MAX_WAIT_SECS: u64 = 60;
const DEFAULT_WAIT_SECS: u64 = 30;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Seconds to wait at most (default 30, at most 60); the answer then
    /// shows the operation still running.
    #[param(minimum = 0, maximum = 60)]
    timeout_secs: Option<u64>,
}

/// Wait for an operation to end: the answer comes when it has (or after
/// `timeout_secs`, still running), so a client need not poll.
#[utoipa::path(get, path = "/api/v1/operations/{id}/wait", params(IdPath, WaitQuery),
    responses((status = 200, body = OperationResponse), (status = 404, body = ErrorBody)))]
pub(super) async fn wait(
    State(app): State<AppState>,
    Path(IdPath { id }): Path<IdPath>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<OperationResponse>, ApiError> {
    let secs = query.timeout_secs.unwrap_or(DEFAULT_WAIT_SECS);
    if secs > MAX_WAIT_SECS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("timeout_secs must be at most {MAX_WAIT_SECS}, not {secs}"),
        ));
    }
    let operation = app
        .node
        .operations()
        .wait(&id, Duration::from_secs(secs))
        .await?;
    Ok(Json(OperationResponse { operation }))
}

/// Cancel a running operation that can be cancelled; it ends `cancelled`
/// once what it made is removed.
#[utoipa::path(delete, path = "/api/v1/operations/{id}", params(IdPath),
    responses((status = 202, body = OperationResponse), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn cancel(
    State(app): State<AppState>,
    Path(IdPath { id }): Path<IdPath>,
) -> Result<Response, ApiError> {
    Ok(accepted(app.node.operations().cancel(&id)?))
}
