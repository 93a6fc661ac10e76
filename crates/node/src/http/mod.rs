//! The REST API: thin handlers that parse, call one domain function and map
//! its result. Errors are always `{"error": {"code", "message"}}`.

mod access;
mod console;
mod contract;
mod files;
pub mod guard;

use self::contract::{Contract, NamePath, SnapshotPath};
mod metrics;
mod operations;
mod pools;
mod rfb;
mod unread;
pub mod viewers;
mod vnc;
pub mod web;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, delete, get, post};
use axum::{Json, Router};
use quetzal_api::{
    CloneVm, CreateNetwork, CreateSnapshot, CreateTemplate, CreateVm, ErrorBody, ErrorDetail,
    Event, EventPage, Host, Network, OperationResponse, SnapshotList, Template, Vm, VmState,
};
use serde::Deserialize;
use tokio_stream::{Stream, StreamExt};
use utoipa::OpenApi;

use self::guard::Access;
use crate::node::{Created, DEFAULT_STOP_TIMEOUT, ErrorKind, Node, NodeError, Published};
use quetzal_api::Role;

/// The largest message a console client may send (typed input): what
/// a client can make us hold is bounded.
pub const CONSOLE_MAX_MESSAGE: usize = 64 * 1024;
/// The largest message a VNC client may send (RFB input and clipboard).
pub const VNC_MAX_MESSAGE: usize = 1 << 20;

/// Ends a WebSocket whose client sent what we refuse (a message past the
/// limit, a broken frame) with a close frame that says why: 1009 (too
/// big) or 1002 (protocol error).
async fn close_for(socket: &mut axum::extract::ws::WebSocket, err: &axum::Error) {
    use axum::extract::ws::{CloseFrame, Message, close_code};
    let text = err.to_string();
    let code = if text.contains("too long") || text.contains("too big") {
        close_code::SIZE
    } else {
        close_code::PROTOCOL
    };
    // A close frame's reason is at most 123 bytes.
    let reason: String = text.chars().take(100).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub node: Arc<Node>,
    pub host: Arc<quetzal_engine::host::HostInfo>,
    /// The consoles, screens and event streams open now.
    pub viewers: Arc<viewers::Viewers>,
    /// The HTTPS listener's certificate fingerprint, when there is one.
    pub tls_fingerprint: Option<String>,
    /// Whether this is the TCP listener's router (callers need
    /// credentials) rather than the Unix socket's.
    pub tcp: bool,
    /// How often each client address tried to log in.
    pub logins: Arc<web::LoginLimits>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(err: NodeError) -> Self {
        let status = match err.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict | ErrorKind::Cancelled => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::AgentUnavailable => StatusCode::CONFLICT,
            ErrorKind::AgentTimeout => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError::new(status, err.code(), err.to_string())
    }
}

/// A JSON body whose rejections (bad JSON, unknown fields, wrong content
/// type) are our JSON errors.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(value)| Body(value))
            .map_err(|rejection: JsonRejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the request body is larger than {} KiB", MAX_BODY / 1024),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        rejection.body_text(),
                    )
                }
            })
    }
}

/// Path parameters, rejected the same way (a bad percent-encoding).
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection: PathRejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    rejection.body_text(),
                )
            })
    }
}

/// A query string, rejected the same way.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    rejection.body_text(),
                )
            })
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Quetzal API", description = "quetzald's REST API"),
    modifiers(&Contract),
    paths(
        list_vms,
        create_vm,
        get_vm,
        delete_vm,
        start_vm,
        stop_vm,
        force_stop_vm,
        restart_vm,
        pause_vm,
        resume_vm,
        clone_vm,
        exec_vm,
        reidentify_vm,
        get_clipboard,
        set_clipboard,
        files::read,
        files::write,
        list_templates,
        create_template,
        get_template,
        delete_template,
        delete_image,
        pools::list_pools,
        pools::create_pool,
        pools::get_pool,
        pools::update_pool,
        pools::delete_pool,
        pools::assign_desktop,
        pools::release_desktop,
        list_snapshots,
        create_snapshot,
        revert_snapshot,
        delete_snapshot,
        list_networks,
        create_network,
        get_network,
        delete_network,
        list_events,
        vm_stats,
        operations::list,
        operations::get,
        operations::wait,
        operations::cancel,
        web::login,
        web::logout,
        access::list_tokens,
        access::create_token,
        access::revoke_token,
        access::audit,
        host
    ),
    components(schemas(
        Vm,
        CreateVm,
        CloneVm,
        Template,
        quetzal_api::WarmTemplate,
        quetzal_api::Clipboard,
        CreateTemplate,
        quetzal_api::Pool,
        quetzal_api::CreatePool,
        quetzal_api::UpdatePool,
        quetzal_api::AssignDesktop,
        quetzal_api::Assigned,
        quetzal_api::PoolDesktop,
        quetzal_api::DesktopState,
        quetzal_api::Snapshot,
        SnapshotList,
        CreateSnapshot,
        Network,
        CreateNetwork,
        quetzal_api::Lease,
        VmState,
        Event,
        EventPage,
        ErrorBody,
        ErrorDetail,
        Host,
        quetzal_api::VmStats,
        quetzal_api::VmMemory,
        quetzal_api::Ksm,
        quetzal_api::Login,
        quetzal_api::RestartPolicy,
        quetzal_api::Operation,
        quetzal_api::OperationKind,
        quetzal_api::OperationState,
        OperationResponse,
        quetzal_api::OperationList,
        quetzal_api::Role,
        quetzal_api::Token,
        quetzal_api::CreateToken,
        quetzal_api::CreatedToken,
        quetzal_api::AuditEntry,
        quetzal_api::Agent,
        quetzal_api::GuestFilesystem,
        quetzal_api::CloudInit,
        quetzal_api::Exec,
        quetzal_api::ExecResult,
        quetzal_api::Reidentified,
        quetzal_api::ReidentifyStep
    ))
)]
pub struct ApiDoc;

/// One route: its method and path (as the router matches it) and who
/// may call it. [`routes`] lists every route the router has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

/// Every route, with who may call it and what serves it: the router is
/// built from this table and nothing else, so [`routes`] is the whole
/// router (a test walks it).
fn table() -> Vec<(Route, MethodRouter<AppState>)> {
    use Access::{Needs, Open};
    use Role::{Admin, Operator, Viewer};
    let route = |method: Method, path: &'static str, access: Access, handler| {
        (
            Route {
                method,
                path,
                access,
            },
            handler,
        )
    };
    let vm = "/api/v1/vms/{name}";
    vec![
        route(Method::GET, "/", Open, get(web::index)),
        route(Method::GET, "/assets/{*path}", Open, get(web::asset)),
        route(Method::POST, "/api/v1/session", Open, post(web::login)),
        route(Method::DELETE, "/api/v1/session", Open, delete(web::logout)),
        route(Method::GET, "/api/v1/vms", Needs(Viewer), get(list_vms)),
        route(
            Method::POST,
            "/api/v1/vms",
            Needs(Operator),
            post(create_vm),
        ),
        route(Method::GET, vm, Needs(Viewer), get(get_vm)),
        route(Method::DELETE, vm, Needs(Operator), delete(delete_vm)),
        route(
            Method::GET,
            "/api/v1/vms/{name}/console",
            Needs(Operator),
            get(console::console),
        ),
        route(
            Method::GET,
            "/api/v1/vms/{name}/vnc",
            Needs(Operator),
            get(vnc::vnc),
        ),
        route(
            Method::GET,
            "/api/v1/vms/{name}/stats",
            Needs(Viewer),
            get(vm_stats),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/clone",
            Needs(Operator),
            post(clone_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/exec",
            Needs(Operator),
            post(exec_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/reidentify",
            Needs(Operator),
            post(reidentify_vm),
        ),
        route(
            Method::GET,
            "/api/v1/vms/{name}/clipboard",
            Needs(Operator),
            get(get_clipboard),
        ),
        route(
            Method::PUT,
            "/api/v1/vms/{name}/clipboard",
            Needs(Operator),
            axum::routing::put(set_clipboard).layer(axum::extract::DefaultBodyLimit::max(
                2 * crate::node::MAX_CLIPBOARD_BYTES,
            )),
        ),
        route(
            Method::GET,
            "/api/v1/vms/{name}/files",
            Needs(Operator),
            get(files::read),
        ),
        route(
            Method::PUT,
            "/api/v1/vms/{name}/files",
            Needs(Operator),
            axum::routing::put(files::write).layer(axum::extract::DefaultBodyLimit::max(
                crate::node::MAX_GUEST_FILE,
            )),
        ),
        route(
            Method::GET,
            "/api/v1/vms/{name}/snapshots",
            Needs(Viewer),
            get(list_snapshots),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/snapshots",
            Needs(Operator),
            post(create_snapshot),
        ),
        route(
            Method::DELETE,
            "/api/v1/vms/{name}/snapshots/{snapshot}",
            Needs(Operator),
            delete(delete_snapshot),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/snapshots/{snapshot}/revert",
            Needs(Operator),
            post(revert_snapshot),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/start",
            Needs(Operator),
            post(start_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/stop",
            Needs(Operator),
            post(stop_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/force-stop",
            Needs(Operator),
            post(force_stop_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/restart",
            Needs(Operator),
            post(restart_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/pause",
            Needs(Operator),
            post(pause_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/resume",
            Needs(Operator),
            post(resume_vm),
        ),
        route(
            Method::POST,
            "/api/v1/vms/{name}/{action}",
            Needs(Operator),
            post(unknown_action),
        ),
        route(
            Method::GET,
            "/api/v1/templates",
            Needs(Viewer),
            get(list_templates),
        ),
        route(
            Method::POST,
            "/api/v1/templates",
            Needs(Operator),
            post(create_template),
        ),
        route(
            Method::GET,
            "/api/v1/templates/{name}",
            Needs(Viewer),
            get(get_template),
        ),
        route(
            Method::DELETE,
            "/api/v1/templates/{name}",
            Needs(Operator),
            delete(delete_template),
        ),
        route(
            Method::GET,
            "/api/v1/pools",
            Needs(Viewer),
            get(pools::list_pools),
        ),
        route(
            Method::POST,
            "/api/v1/pools",
            Needs(Operator),
            post(pools::create_pool),
        ),
        route(
            Method::GET,
            "/api/v1/pools/{name}",
            Needs(Viewer),
            get(pools::get_pool),
        ),
        route(
            Method::PATCH,
            "/api/v1/pools/{name}",
            Needs(Operator),
            axum::routing::patch(pools::update_pool),
        ),
        route(
            Method::DELETE,
            "/api/v1/pools/{name}",
            Needs(Operator),
            delete(pools::delete_pool),
        ),
        route(
            Method::POST,
            "/api/v1/pools/{name}/assign",
            Needs(Operator),
            post(pools::assign_desktop),
        ),
        route(
            Method::POST,
            "/api/v1/pools/{name}/desktops/{vm}/release",
            Needs(Operator),
            post(pools::release_desktop),
        ),
        route(
            Method::DELETE,
            "/api/v1/images/{name}",
            Needs(Admin),
            delete(delete_image),
        ),
        route(
            Method::GET,
            "/api/v1/networks",
            Needs(Viewer),
            get(list_networks),
        ),
        route(
            Method::POST,
            "/api/v1/networks",
            Needs(Admin),
            post(create_network),
        ),
        route(
            Method::GET,
            "/api/v1/networks/{name}",
            Needs(Viewer),
            get(get_network),
        ),
        route(
            Method::DELETE,
            "/api/v1/networks/{name}",
            Needs(Admin),
            delete(delete_network),
        ),
        route(
            Method::GET,
            "/api/v1/operations",
            Needs(Viewer),
            get(operations::list),
        ),
        route(
            Method::GET,
            "/api/v1/operations/{id}",
            Needs(Viewer),
            get(operations::get),
        ),
        route(
            Method::DELETE,
            "/api/v1/operations/{id}",
            Needs(Operator),
            delete(operations::cancel),
        ),
        route(
            Method::GET,
            "/api/v1/operations/{id}/wait",
            Needs(Viewer),
            get(operations::wait),
        ),
        route(
            Method::GET,
            "/api/v1/events",
            Needs(Viewer),
            get(list_events),
        ),
        route(
            Method::GET,
            "/api/v1/events/stream",
            Needs(Viewer),
            get(stream_events),
        ),
        route(Method::GET, "/api/v1/host", Needs(Viewer), get(host)),
        route(
            Method::GET,
            "/api/v1/tokens",
            Needs(Admin),
            get(access::list_tokens),
        ),
        route(
            Method::POST,
            "/api/v1/tokens",
            Needs(Admin),
            post(access::create_token),
        ),
        route(
            Method::DELETE,
            "/api/v1/tokens/{name}",
            Needs(Admin),
            delete(access::revoke_token),
        ),
        route(
            Method::GET,
            "/api/v1/audit",
            Needs(Admin),
            get(access::audit),
        ),
        route(
            Method::GET,
            "/api/v1/openapi.json",
            Needs(Viewer),
            get(openapi),
        ),
        route(
            Method::GET,
            "/metrics",
            Needs(Viewer),
            get(metrics::metrics),
        ),
    ]
}

/// Every route of the router, with who may call it.
pub fn routes() -> Vec<Route> {
    table().into_iter().map(|(route, _)| route).collect()
}

/// The API and the dashboard. On the TCP listener (`state.tcp`) every
/// route but the dashboard's files and login needs a token or a session
/// with the route's role; on the Unix socket the socket's file mode is
/// the access control and the caller is `local`, an admin.
pub fn router(state: AppState) -> Router {
    let guarded = |access: Access, handler: MethodRouter<AppState>| {
        handler.route_layer(middleware::from_fn_with_state(
            (state.clone(), access),
            guard::guard,
        ))
    };
    let mut router = Router::new();
    for (route, handler) in table() {
        router = router.route(route.path, guarded(route.access, handler));
    }
    // An unknown path needs credentials too: without, it answers 401, not
    // which paths exist.
    let unknown = any(not_found).layer(middleware::from_fn_with_state(
        (state.clone(), Access::Needs(Role::Viewer)),
        guard::guard,
    ));
    router
        .fallback_service(unknown.with_state(state.clone()))
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(unread::close_if_unread))
}

/// The largest request body the API reads (every body is a small JSON
/// object; a client cannot make the daemon buffer more).
pub const MAX_BODY: usize = 256 * 1024;

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only VMs in this state.
    #[param(value_type = Option<VmState>)]
    state: Option<String>,
    /// Only VMs with this label, as `key=value`.
    #[param(pattern = "^[^=]+=.*$")]
    label: Option<String>,
}

/// List VMs.
#[utoipa::path(get, path = "/api/v1/vms", params(ListQuery),
    responses((status = 200, body = Vec<Vm>), (status = 400, body = ErrorBody)))]
async fn list_vms(
    State(app): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    let state = match query.state.as_deref() {
        None => None,
        Some(text) => Some(VmState::parse(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown state '{text}'"),
            )
        })?),
    };
    let labels = match query.label.as_deref() {
        None => vec![],
        Some(pair) => {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "label must be key=value",
                )
            })?;
            vec![(key.to_owned(), value.to_owned())]
        }
    };
    Ok(Json(app.node.list(state, &labels)?))
}

/// Create a VM (stopped). A full clone copies its disk in an operation.
#[utoipa::path(post, path = "/api/v1/vms", request_body = CreateVm,
    responses((status = 201, body = Vm), (status = 202, body = OperationResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
async fn create_vm(
    State(app): State<AppState>,
    Body(request): Body<CreateVm>,
) -> Result<Response, ApiError> {
    Ok(match app.node.create(request).await? {
        Created::Vm(vm) => (StatusCode::CREATED, Json(*vm)).into_response(),
        Created::Operation(op) => operations::accepted(op),
    })
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}", params(contract::NamePath),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(app.node.show(&name).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    /// Keep the VM's disk files.
    #[serde(default)]
    keep_disks: bool,
}

/// Delete a stopped VM (and its disks unless `keep_disks`).
#[utoipa::path(delete, path = "/api/v1/vms/{name}", params(contract::NamePath, DeleteQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_vm(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    app.node.delete(&name, query.keep_disks).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    /// For stop and restart: seconds to wait for the guest before forcing
    /// it off (default 30, at most 3600).
    #[param(minimum = 0, maximum = 3600)]
    timeout_secs: Option<u64>,
}

/// The longest graceful stop a request may ask for.
const MAX_STOP_TIMEOUT_SECS: u64 = 3600;

macro_rules! vm_action {
    ($handler:ident, $path:literal, $doc:literal, |$node:ident, $name:ident, $timeout:ident| $call:expr) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, params(contract::NamePath, ActionQuery),
                            responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
                                (status = 409, body = ErrorBody)))]
        async fn $handler(
            State(app): State<AppState>,
            Path(NamePath { name: $name }): Path<NamePath>,
            Query(query): Query<ActionQuery>,
        ) -> Result<Json<Vm>, ApiError> {
            let $timeout = match query.timeout_secs {
                None => DEFAULT_STOP_TIMEOUT,
                Some(secs) if secs <= MAX_STOP_TIMEOUT_SECS => Duration::from_secs(secs),
                Some(secs) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("timeout_secs must be at most {MAX_STOP_TIMEOUT_SECS}, not {secs}"),
                    ));
                }
            };
            let $node = &app.node;
            Ok(Json($call))
        }
    };
}

vm_action!(
    start_vm,
    "/api/v1/vms/{name}/start",
    "Start a stopped or crashed VM.",
    |node, name, _timeout| node.start(&name).await?
);
vm_action!(
    stop_vm,
    "/api/v1/vms/{name}/stop",
    "Stop a VM: the power button, then forced off after `timeout_secs`.",
    |node, name, timeout| node.stop(&name, timeout).await?
);
vm_action!(
    force_stop_vm,
    "/api/v1/vms/{name}/force-stop",
    "End a VM's process at once.",
    |node, name, _timeout| node.force_stop(&name).await?
);
vm_action!(
    restart_vm,
    "/api/v1/vms/{name}/restart",
    "Stop, then start a running VM.",
    |node, name, timeout| node.restart(&name, timeout).await?
);
vm_action!(
    pause_vm,
    "/api/v1/vms/{name}/pause",
    "Freeze a running VM's vCPUs.",
    |node, name, _timeout| node.pause(&name).await?
);
vm_action!(
    resume_vm,
    "/api/v1/vms/{name}/resume",
    "Let a paused VM run again.",
    |node, name, _timeout| node.resume(&name).await?
);

/// Any other action on a VM: not one (404, naming those there are).
async fn unknown_action(Path((_, action)): Path<(String, String)>) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no action '{action}' (start, stop, force-stop, restart, pause, resume)"),
    )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only events after this id.
    #[serde(default)]
    after: i64,
    /// Instead of `after`: the `limit` events just before this id, still
    /// oldest first (a very large id gives the newest).
    before: Option<i64>,
    /// At most this many (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only this VM's events.
    vm: Option<String>,
}

/// The event log, oldest first, paged.
#[utoipa::path(get, path = "/api/v1/events", params(EventsQuery),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody)))]
async fn list_events(
    State(app): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "limit must be between 1 and 1000",
        ));
    }
    let full = |events: &[Event]| events.len() == usize::try_from(limit).unwrap_or(usize::MAX);
    if let Some(before) = query.before {
        if query.after != 0 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "after and before cannot be combined",
            ));
        }
        let events = app.node.events_before(before, limit, query.vm.as_deref())?;
        let next_before = full(&events)
            .then(|| events.first().map(|e| e.id))
            .flatten();
        return Ok(Json(EventPage {
            events,
            next_after: None,
            next_before,
        }));
    }
    let events = app.node.events(query.after, limit, query.vm.as_deref())?;
    let next_after = full(&events).then(|| events.last().map(|e| e.id)).flatten();
    Ok(Json(EventPage {
        events,
        next_after,
        next_before: None,
    }))
}

/// Events as they happen (server-sent events, one JSON `Event` each).
async fn stream_events(
    State(app): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::node::access::Caller>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    // Held as long as the stream: dropped with it when the client leaves.
    let seat = app.viewers.stream(&caller.who)?;
    let events = tokio_stream::wrappers::BroadcastStream::new(app.node.subscribe()).filter_map(
        move |event| {
            let _seat = &seat;
            let event = event.ok()?;
            let sse = match event {
                Published::Event(event) => SseEvent::default()
                    .id(event.id.to_string())
                    .json_data(&event),
                Published::Operation(op) => SseEvent::default()
                    .event("operation")
                    .json_data(&OperationResponse { operation: op }),
                Published::Pool(pool) => SseEvent::default()
                    .event("pool")
                    .json_data(serde_json::json!({ "pool": pool })),
            };
            sse.ok().map(Ok)
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The host and its VM counts.
#[utoipa::path(get, path = "/api/v1/host", responses((status = 200, body = Host)))]
async fn host(State(app): State<AppState>) -> Result<Json<Host>, ApiError> {
    let mut by_state: BTreeMap<String, u64> = VmState::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), 0))
        .collect();
    for vm in app.node.list(None, &[])? {
        *by_state.entry(vm.state.as_str().to_owned()).or_default() += 1;
    }
    let info = &app.host;
    Ok(Json(Host {
        cpu_model: info.cpu_model.clone(),
        cpus: info.cpus,
        memory_mib: info.memory_mib,
        hardware_virtualization: info.hardware_virtualization,
        qemu_version: info.qemu_version.clone(),
        accel: info.accel.to_string(),
        accel_reason: info.accel_reason.clone(),
        vms_by_state: by_state,
        tls_fingerprint: app.tls_fingerprint.clone(),
        ksm: app.node.ksm().map(|ksm| {
            let counters = ksm.counters();
            quetzal_api::Ksm {
                mode: ksm.mode().as_str().to_owned(),
                running: counters.running,
                pages_shared: counters.pages_shared,
                pages_sharing: counters.pages_sharing,
                saved_bytes: counters.pages_sharing * crate::ksm::PAGE_BYTES,
            }
        }),
    }))
}

/// Run a command in a running VM's guest through its agent; answers when
/// it ends (or 504 past `timeout_secs`).
#[utoipa::path(post, path = "/api/v1/vms/{name}/exec", params(contract::NamePath), request_body = quetzal_api::Exec,
    responses((status = 200, body = quetzal_api::ExecResult), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn exec_vm(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<quetzal_api::Exec>,
) -> Result<Json<quetzal_api::ExecResult>, ApiError> {
    Ok(Json(app.node.exec(&name, request).await?))
}

/// Make a running VM's guest a new machine through quetzal-agent (new
/// machine-id and SSH host keys, the VM's name as host name, a DHCP
/// renew, the host's time), as a clone of another guest needs; answers
/// what each step did.
#[utoipa::path(post, path = "/api/v1/vms/{name}/reidentify", params(contract::NamePath),
    responses((status = 200, body = quetzal_api::Reidentified), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn reidentify_vm(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<quetzal_api::Reidentified>, ApiError> {
    Ok(Json(app.node.reidentify(&name).await?))
}

/// The text on a running desktop guest's clipboard (through its agent).
#[utoipa::path(get, path = "/api/v1/vms/{name}/clipboard", params(contract::NamePath),
    responses((status = 200, body = quetzal_api::Clipboard), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn get_clipboard(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<quetzal_api::Clipboard>, ApiError> {
    let text = app.node.clipboard(&name).await?;
    Ok(Json(quetzal_api::Clipboard { text }))
}

/// Put text on a running desktop guest's clipboard, for its user to paste.
#[utoipa::path(put, path = "/api/v1/vms/{name}/clipboard", params(contract::NamePath),
    request_body = quetzal_api::Clipboard,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn set_clipboard(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<quetzal_api::Clipboard>,
) -> Result<StatusCode, ApiError> {
    app.node.set_clipboard(&name, &request.text).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Clone a stopped VM into a new, stopped VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/clone", params(contract::NamePath), request_body = CloneVm,
    responses((status = 202, body = OperationResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn clone_vm(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<CloneVm>,
) -> Result<Response, ApiError> {
    Ok(operations::accepted(
        app.node.clone_vm(&name, request).await?,
    ))
}

/// List templates.
#[utoipa::path(get, path = "/api/v1/templates", responses((status = 200, body = Vec<Template>)))]
async fn list_templates(State(app): State<AppState>) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(app.node.templates()?))
}

/// Turn a stopped VM into a template (the VM is consumed).
#[utoipa::path(post, path = "/api/v1/templates", request_body = CreateTemplate,
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_template(
    State(app): State<AppState>,
    Body(request): Body<CreateTemplate>,
) -> Result<Response, ApiError> {
    Ok(operations::accepted(
        app.node.create_template(request).await?,
    ))
}

/// One template.
#[utoipa::path(get, path = "/api/v1/templates/{name}", params(contract::NamePath),
    responses((status = 200, body = Template), (status = 404, body = ErrorBody)))]
async fn get_template(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(app.node.template(&name)?))
}

/// Delete a template no VM is a linked clone of.
#[utoipa::path(delete, path = "/api/v1/templates/{name}", params(contract::NamePath),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_template(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<StatusCode, ApiError> {
    app.node.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Delete an image (every build of it) no VM or template was made from.
#[utoipa::path(delete, path = "/api/v1/images/{name}", params(contract::NamePath),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_image(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<StatusCode, ApiError> {
    app.node.delete_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A running VM's resource counters (the dashboard's charts poll these).
#[utoipa::path(get, path = "/api/v1/vms/{name}/stats", params(contract::NamePath),
    responses((status = 200, body = quetzal_api::VmStats), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn vm_stats(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<quetzal_api::VmStats>, ApiError> {
    Ok(Json(app.node.vm_stats(&name).await?))
}

/// Managed networks, oldest first, with their leases.
#[utoipa::path(get, path = "/api/v1/networks", responses((status = 200, body = Vec<Network>)))]
async fn list_networks(State(app): State<AppState>) -> Result<Json<Vec<Network>>, ApiError> {
    Ok(Json(app.node.networks().list()?))
}

/// Create a network: a bridge with DHCP, DNS and NAT.
#[utoipa::path(post, path = "/api/v1/networks", request_body = CreateNetwork,
    responses((status = 201, body = Network), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_network(
    State(app): State<AppState>,
    Body(request): Body<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(app.node.networks().create(request).await?),
    ))
}

/// One network, with its leases.
#[utoipa::path(get, path = "/api/v1/networks/{name}", params(contract::NamePath),
    responses((status = 200, body = Network), (status = 404, body = ErrorBody)))]
async fn get_network(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(app.node.networks().get(&name)?))
}

/// Delete a network no VM uses.
#[utoipa::path(delete, path = "/api/v1/networks/{name}", params(contract::NamePath),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_network(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<StatusCode, ApiError> {
    app.node.networks().delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A VM's snapshots and the one it is at.
#[utoipa::path(get, path = "/api/v1/vms/{name}/snapshots", params(contract::NamePath),
    responses((status = 200, body = SnapshotList), (status = 404, body = ErrorBody)))]
async fn list_snapshots(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
) -> Result<Json<SnapshotList>, ApiError> {
    Ok(Json(app.node.snapshots(&name)?))
}

/// Take a snapshot (with memory while running, disk-only while stopped).
#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots", params(contract::NamePath), request_body = CreateSnapshot,
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_snapshot(
    State(app): State<AppState>,
    Path(NamePath { name }): Path<NamePath>,
    Body(request): Body<CreateSnapshot>,
) -> Result<Response, ApiError> {
    Ok(operations::accepted(
        app.node.snapshot_create(&name, request).await?,
    ))
}

/// Go back to a snapshot.
#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots/{snapshot}/revert", params(contract::SnapshotPath),
    responses((status = 202, body = OperationResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn revert_snapshot(
    State(app): State<AppState>,
    Path(SnapshotPath { name, snapshot }): Path<SnapshotPath>,
) -> Result<Response, ApiError> {
    Ok(operations::accepted(
        app.node.snapshot_revert(&name, &snapshot).await?,
    ))
}

/// Delete a snapshot.
#[utoipa::path(delete, path = "/api/v1/vms/{name}/snapshots/{snapshot}", params(contract::SnapshotPath),
    responses((status = 202, body = OperationResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_snapshot(
    State(app): State<AppState>,
    Path(SnapshotPath { name, snapshot }): Path<SnapshotPath>,
) -> Result<Response, ApiError> {
    Ok(operations::accepted(
        app.node.snapshot_delete(&name, &snapshot).await?,
    ))
}
