//! quetzald, the node daemon: keeps VMs in a SQLite store, runs each under
//! a supervisor over its engine (QEMU), and serves the REST API on a Unix
//! socket (and, with a token, on TCP over TLS).
//!
//! - [`node`]: the domain (VM lifecycle, restart policy, recovery).
//! - [`lifecycle`]: which action is legal in which state.
//! - [`net`]: managed networks on the host (bridges, dnsmasq, nftables).
//! - [`supervisor`]: one task per running VM.
//! - [`store`]: the SQLite store.
//! - [`http`]: the REST API, events stream, metrics, consoles.

pub mod agent;
pub mod cloud_init;
pub mod consolelog;
pub mod http;
pub mod ksm;
pub mod lifecycle;
pub mod listener;
pub mod net;
pub mod node;
pub mod ratelimit;
pub mod services;
pub mod store;
pub mod supervisor;
pub mod tls;
pub mod token;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{SignalKind, signal};

/// The Unix socket quetzald serves in its data directory.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("quetzald.sock")
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Also serve on this TCP address (HTTPS), with a token required.
    pub listen: Option<SocketAddr>,
    /// The certificate and key to serve HTTPS with; the node's own
    /// (made at first start) when none.
    pub tls: Option<tls::Given>,
    /// What the node does with the host's KSM.
    pub ksm: ksm::KsmMode,
}

/// Runs the daemon until SIGTERM or SIGINT. Running VMs are left running:
/// the next start re-attaches to them.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let lock_path = data.join("quetzald.lock");
    let lock_file = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow::anyhow!("another quetzald is already serving {}", data.display()))?;

    // Before anything starts: a bad certificate stops the daemon here, and
    // never leaves a listener that falls back to plain HTTP.
    let identity = match config.listen {
        Some(_) => Some(tls::identity(data, config.tls.as_ref())?),
        None => None,
    };
    let engines = quetzal_engine::Engines::of_this_host();
    let host = engines.host_info(None)?;
    let node = node::Node::open(data, engines).await?;
    match ksm::Ksm::of_this_host(config.ksm) {
        Some(ksm) => node.manage_ksm(ksm),
        None => tracing::info!("this kernel has no KSM"),
    }
    node.access()
        .ensure_first_admin(data, store::now_millis())
        .context("cannot create the first API token")?;
    let state = http::AppState {
        node,
        host: Arc::new(host),
        viewers: Arc::default(),
        tls_fingerprint: identity.as_ref().map(|id| id.fingerprint.clone()),
        tcp: false,
        logins: Arc::default(),
    };

    let socket = socket_path(data);
    let _ = std::fs::remove_file(&socket);
    let unix = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;
    tracing::info!(socket = %socket.display(), "quetzald serving");
    // With each connection's peer credentials, for the audit log.
    let unix_server = axum::serve(
        unix,
        http::router(state.clone()).into_make_service_with_connect_info::<http::guard::UnixPeer>(),
    );

    let tcp_server = match (config.listen, identity) {
        (Some(addr), Some(identity)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let addr = listener.local_addr()?;
            tracing::info!(
                %addr,
                fingerprint = %identity.fingerprint,
                "quetzald serving HTTPS on TCP (token required)"
            );
            let app = http::router(http::AppState { tcp: true, ..state });
            Some(listener::serve(listener, identity.config, app))
        }
        _ => None,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        result = unix_server.into_future() => result.map_err(anyhow::Error::from),
        result = async {
            match tcp_server {
                Some(server) => {
                    server.await;
                    Ok(())
                }
                None => std::future::pending().await,
            }
        } => result,
        _ = terminate.recv() => Ok(()),
        _ = interrupt.recv() => Ok(()),
    };
    let _ = std::fs::remove_file(&socket);
    tracing::info!("quetzald stopped; VMs keep running");
    result
}
