//! The TCP listener: HTTPS only. Each connection is told apart by its
//! first byte — a TLS handshake is served, anything else (plain HTTP) gets
//! a refusal that names the https:// address and no API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long a client has for its TLS handshake (and a plain-HTTP client
/// for its request head). After the handshake no timer runs: hyper's
/// header-read timeout also counts the idle time of a kept-alive
/// connection, and closed browsers' pooled connections under them (a
/// POST on a socket the server had just closed failed in the browser).
const HANDSHAKE: Duration = Duration::from_secs(10);
/// A TLS record starts with this content type (handshake).
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves `app` on `listener` with `tls` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) {
    let acceptor = TlsAcceptor::from(tls);
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: the listener itself
                // is fine; try again shortly rather than spin.
                tracing::warn!(%err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            if let Err(err) = connection(stream, peer, local, acceptor, app).await {
                tracing::debug!(%peer, %err, "connection ended");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    acceptor: TlsAcceptor,
    app: Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    if tokio::time::timeout(HANDSHAKE, stream.peek(&mut first)).await?? == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE {
        return refuse_plain(stream, local).await;
    }
    let tls = tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await??;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // What the login's rate limit and the audit log know the client by.
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request)
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await?;
    Ok(())
}

/// Plain HTTP on the HTTPS port: read the request's head (bounded), answer
/// 400 with where to go instead, close.
async fn refuse_plain(
    mut stream: TcpStream,
    local: Option<SocketAddr>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let _ = tokio::time::timeout(HANDSHAKE, async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let body = match local {
        Some(addr) => format!(
            "This is quetzald's HTTPS port; plain HTTP gets no API here. Use {}\n",
            crate::tls::https_url(addr)
        ),
        None => "This is quetzald's HTTPS port; plain HTTP gets no API here.\n".to_owned(),
    };
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
