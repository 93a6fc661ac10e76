//! `/api/v1/vms/{name}/files?path=…`: a file into or out of a running
//! guest, through its agent (`quetzal vm cp`). Bodies are raw bytes, at
//! most 64 MiB.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use quetzal_api::ErrorBody;
use serde::Deserialize;

use super::contract::NamePath;
use super::{ApiError, AppState, Path, Query};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuery {
    /// The file's absolute path in the guest.
    #[param(min_length = 1, max_length = 4096, pattern = "^/")]
    path: String,
}

/// Read a file from a running guest.
#[utoipa::path(get, path = "/api/v1/vms/{name}/files", params(NamePath, FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub(super) async fn read(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Query(FileQuery { path }): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let bytes = app.node.read_file(&name, &path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Write a file into a running guest (made, or replaced).
#[utoipa::path(put, path = "/api/v1/vms/{name}/files", params(NamePath, FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub(super) async fn write(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Query(FileQuery { path }): Query<FileQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "a file copied into a guest is at most {} MiB",
                    crate::node::MAX_GUEST_FILE >> 20
                ),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                rejection.body_text(),
            )
        }
    })?;
    app.node.write_file(&name, &path, &bytes).await?;
    Ok(StatusCode::NO_CONTENT)
}
