//! What the OpenAPI document says beyond each handler's own annotation:
//! the path parameters, the bearer scheme applied to every operation but
//! the login, and the error answers every operation can give (401 on the
//! TCP listener, 400 where something is parsed, 413 where a body is read,
//! 500 for a bug).

use serde::Deserialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

/// A VM, template, network or snapshot name in a path.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct NamePath {
    /// The VM's (template's, network's) name.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    pub name: String,
}

/// A VM's snapshot in a path.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct SnapshotPath {
    /// The VM's name.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    pub name: String,
    /// The snapshot's name.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    pub snapshot: String,
}

/// A pool's desktop in a path.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct DesktopPath {
    /// The pool's name.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    pub name: String,
    /// The desktop's VM.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    pub vm: String,
}

/// An operation in a path.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct IdPath {
    /// The operation's id.
    pub id: String,
}

/// The security scheme every operation but the login needs on TCP.
pub const BEARER: &str = "bearer";

#[derive(Debug)]
pub(super) struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The node's API token (`quetzal token`), on the TCP listener; the Unix socket needs none",
                    ))
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
        for (path, item) in &mut openapi.paths.paths {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                if path == "/api/v1/session" {
                    // Logging in needs no credentials.
                    operation.security = Some(Vec::new());
                } else {
                    add_error(
                        operation,
                        401,
                        "No valid token or session (TCP listener only)",
                    );
                }
                if operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
                    || operation.request_body.is_some()
                {
                    add_error(operation, 400, "A malformed path, query or body");
                }
                if operation.request_body.is_some() {
                    add_error(
                        operation,
                        413,
                        "A body larger than quetzald reads (256 KiB)",
                    );
                }
                add_error(
                    operation,
                    500,
                    "A failure inside quetzald (a bug or the host)",
                );
            }
        }
    }
}

/// Documents an error answer with the error body, unless the operation
/// documents that status itself.
fn add_error(operation: &mut Operation, status: u16, description: &str) {
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| response.into());
}
