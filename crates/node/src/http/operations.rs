//! `/api/v1/operations`: long work, read and cancelled.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use quetzal_api::{ErrorBody, Operation, OperationList, OperationResponse};

use super::contract::IdPath;
use super::{ApiError, AppState, Path};

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
