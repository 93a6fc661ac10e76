//! `GET /api/v1/vms/{name}/console`: the serial console over a WebSocket.
//! On connect the recent output (the tail of QEMU's console log, which
//! survives reconnects and daemon restarts) comes first, then live output;
//! what the client sends is typed into the guest.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::response::Response;
use tokio::sync::broadcast::error::RecvError;

use axum::Extension;

use super::{ApiError, AppState};
use crate::node::access::Caller;

/// How much recent output a new viewer gets.
const HISTORY_BYTES: u64 = 64 * 1024;

pub async fn console(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let (log, live) = app.node.console(&name)?;
    let seat = app.viewers.of_vm(&name, &caller.who)?;
    Ok(ws
        .max_message_size(super::CONSOLE_MAX_MESSAGE)
        .max_frame_size(super::CONSOLE_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            session(socket, log, live, || app.node.console_input(&name)).await;
            drop(seat);
        }))
}

async fn session(
    mut socket: WebSocket,
    log: std::path::PathBuf,
    live: Option<std::sync::Arc<crate::supervisor::Live>>,
    on_input: impl Fn(),
) {
    // Subscribe before reading the history: a byte may show twice, none is lost.
    let mut output = live.as_ref().map(|live| live.console_out.subscribe());
    let history = tokio::task::spawn_blocking(move || tail(&log, HISTORY_BYTES))
        .await
        .unwrap_or_default();
    if !history.is_empty() && socket.send(Message::Binary(history.into())).await.is_err() {
        return;
    }
    let (Some(live), Some(output)) = (live, output.as_mut()) else {
        let _ = socket.send(Message::Close(None)).await;
        return;
    };
    loop {
        tokio::select! {
            bytes = output.recv() => match bytes {
                Ok(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    on_input();
                    let _ = live.console_in.send(bytes.to_vec()).await;
                }
                Some(Ok(Message::Text(text))) => {
                    on_input();
                    let _ = live.console_in.send(text.as_bytes().to_vec()).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(err)) => {
                    super::close_for(&mut socket, &err).await;
                    return;
                }
                Some(Ok(Message::Close(_))) | None => return,
            },
        }
    }
}

/// The last `max` bytes of a file (empty when it does not exist).
fn tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    bytes
}
