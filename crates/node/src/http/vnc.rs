//! The graphical console: a WebSocket carrying the RFB (VNC) protocol,
//! relayed byte for byte to the VNC server QEMU runs on the VM's Unix
//! socket (never on a TCP port). noVNC in the dashboard speaks RFB.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use axum::Extension;

use super::{ApiError, AppState};
use crate::node::access::Caller;

pub async fn vnc(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    Path(name): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let socket_path = app.node.vnc_socket(&name)?;
    let seat = app.viewers.of_vm(&name, &caller.who)?;
    let server = UnixStream::connect(&socket_path).await.map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("VM {name} has no display to connect to ({e}); it may have been started by an older quetzald"),
        )
    })?;
    // noVNC asks for the `binary` subprotocol.
    Ok(ws
        .protocols(["binary"])
        .max_message_size(super::VNC_MAX_MESSAGE)
        .max_frame_size(super::VNC_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            relay(socket, server, || app.node.console_input(&name)).await;
            drop(seat);
        }))
}

/// Relays RFB both ways; `on_input` is called for each piece of the
/// client's stream that holds a user's input.
async fn relay(mut socket: WebSocket, server: UnixStream, on_input: impl Fn()) {
    let (mut from_vnc, mut to_vnc) = server.into_split();
    let mut scanner = super::rfb::ClientScanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from_vnc.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if scanner.feed(&bytes) {
                        on_input();
                    }
                    if to_vnc.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(err)) => {
                    super::close_for(&mut socket, &err).await;
                    return;
                }
                Some(Ok(Message::Close(_))) | None => return,
            },
        }
    }
}
