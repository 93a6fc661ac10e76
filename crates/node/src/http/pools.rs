//! Desktop pools over HTTP: `/api/v1/pools`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use quetzal_api::{AssignDesktop, Assigned, CreatePool, Pool, PoolDesktop, UpdatePool};

use super::contract::{DesktopPath, NamePath};
use super::{ApiError, AppState, Body, ErrorBody, Path};
use crate::node::access::Caller;

/// List desktop pools, with their desktops.
#[utoipa::path(get, path = "/api/v1/pools", responses((status = 200, body = Vec<Pool>)))]
pub(super) async fn list_pools(State(app): State<AppState>) -> Result<Json<Vec<Pool>>, ApiError> {
    Ok(Json(app.node.pools()?))
}

/// Create a pool: it makes its spares at once, in the background.
#[utoipa::path(post, path = "/api/v1/pools", request_body = CreatePool,
    responses((status = 201, body = Pool), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub(super) async fn create_pool(
    State(app): State<AppState>,
    Body(request): Body<CreatePool>,
) -> Result<(StatusCode, Json<Pool>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.node.create_pool(request)?)))
}

/// One pool.
#[utoipa::path(get, path = "/api/v1/pools/{name}", params(NamePath),
    responses((status = 200, body = Pool), (status = 404, body = ErrorBody)))]
pub(super) async fn get_pool(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(app.node.pool(&name)?))
}

/// Change a pool's template, spares or size.
#[utoipa::path(patch, path = "/api/v1/pools/{name}", params(NamePath), request_body = UpdatePool,
    responses((status = 200, body = Pool), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub(super) async fn update_pool(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<UpdatePool>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(app.node.update_pool(&name, request).await?))
}

/// Delete a pool and its spares (refused while users hold desktops).
#[utoipa::path(delete, path = "/api/v1/pools/{name}", params(NamePath),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn delete_pool(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<StatusCode, ApiError> {
    app.node.delete_pool(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Hand a desktop to a user.
#[utoipa::path(post, path = "/api/v1/pools/{name}/assign", params(NamePath),
    request_body = AssignDesktop,
    responses((status = 200, body = Assigned), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn assign_desktop(
    State(app): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<AssignDesktop>,
) -> Result<Json<Assigned>, ApiError> {
    let user = request.user.unwrap_or(caller.who);
    Ok(Json(app.node.assign(&name, &user).await?))
}

/// Take a desktop back: destroyed and replaced by a fresh clone, or in a
/// persistent pool kept for its user.
#[utoipa::path(post, path = "/api/v1/pools/{name}/desktops/{vm}/release", params(DesktopPath),
    responses((status = 200, body = PoolDesktop), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn release_desktop(
    State(app): State<AppState>,
    Path(DesktopPath { name, vm }): Path<DesktopPath>,
) -> Result<Json<PoolDesktop>, ApiError> {
    Ok(Json(app.node.release(&name, &vm).await?))
}
