//! `quetzal up`: a working node for a newcomer in one command. Builds the
//! default image if needed, starts quetzald in the foreground, creates and
//! starts a demo VM when there is none, and says how to reach it — the
//! dashboard included (quetzald listens on `$QUETZAL_LISTEN`, by default
//! 127.0.0.1:7480).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use quetzal_api::Vm;
use quetzal_image::{DEFAULT_IMAGE, ImageStore};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::Client;

const DEMO: &str = "demo";
const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

pub(crate) fn listen() -> String {
    std::env::var("QUETZAL_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned())
}

pub fn run() -> anyhow::Result<ExitCode> {
    let data = crate::data_dir();
    ImageStore::new(&data).build(DEFAULT_IMAGE, &mut |line| eprintln!("quetzal: {line}"))?;
    crate::block_on(up(data))
}

async fn up(data: PathBuf) -> anyhow::Result<ExitCode> {
    let client = Client::from_env();
    if client.call(Method::GET, "/api/v1/vms", None).await.is_ok() {
        eprintln!("quetzal: quetzald is already serving {}", data.display());
        ensure_demo(&client).await?;
        greet(&data);
        return Ok(ExitCode::SUCCESS);
    }
    let daemon = std::env::current_exe()?
        .parent()
        .context("the quetzal binary has a directory")?
        .join("quetzald");
    let mut child = tokio::process::Command::new(&daemon)
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(listen())
        .spawn()
        .with_context(|| format!("cannot start {}", daemon.display()))?;
    let started = Instant::now();
    while client.call(Method::GET, "/api/v1/vms", None).await.is_err() {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("quetzald exited ({status}) before serving");
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.start_kill();
            anyhow::bail!("quetzald did not start serving within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure_demo(&client).await?;
    greet(&data);
    eprintln!("quetzal: quetzald runs in the foreground; Ctrl-C stops it (VMs keep running)");

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = interrupt.recv() => stop(&mut child, pid).await?,
        _ = terminate.recv() => stop(&mut child, pid).await?,
    };
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn stop(
    child: &mut tokio::process::Child,
    pid: Option<i32>,
) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    Ok(child.wait().await?)
}

async fn ensure_demo(client: &Client) -> anyhow::Result<()> {
    let vms: Vec<Vm> = client.call_as(Method::GET, "/api/v1/vms", None).await?;
    if !vms.is_empty() {
        return Ok(());
    }
    eprintln!("quetzal: creating and starting the demo VM '{DEMO}'");
    let body = json!({ "name": DEMO, "image": DEFAULT_IMAGE, "restart_policy": "on-failure" });
    let answer = client
        .call(Method::POST, "/api/v1/vms", Some(&body))
        .await?;
    // A node that has not built the image yet builds it first (202).
    if let Some(op) = answer.get("operation") {
        let op: quetzal_api::Operation = serde_json::from_value(op.clone())?;
        let what = crate::operation::describe(op.kind);
        crate::operation::finish(client, op, what).await?;
    }
    client
        .call(Method::POST, &format!("/api/v1/vms/{DEMO}/start"), None)
        .await?;
    Ok(())
}

fn greet(data: &std::path::Path) {
    let env = if std::env::var_os("QUETZAL_DATA_DIR").is_some() {
        format!("QUETZAL_DATA_DIR={} ", data.display())
    } else {
        String::new()
    };
    eprintln!("quetzal: the node is up.");
    match crate::vm::read_token(data) {
        Ok(token) => eprintln!(
            "quetzal: dashboard: https://{}/#token={token}  (a login link; `quetzal token` prints the token)",
            listen()
        ),
        Err(err) => eprintln!("quetzal: dashboard: https://{} ({err:#})", listen()),
    }
    match quetzal_node::tls::fingerprint_of_file(&quetzal_node::tls::dir(data).join("node.crt")) {
        Ok(fingerprint) => eprintln!(
            "quetzal: its certificate is the node's own; SHA-256 fingerprint {fingerprint}"
        ),
        Err(err) => eprintln!("quetzal: {err}"),
    }
    eprintln!("quetzal: in another terminal:");
    eprintln!("    {env}quetzal vm list");
    eprintln!("    {env}quetzal vm console {DEMO}      (Ctrl-] detaches)");
    eprintln!("    {env}quetzal events --follow");
}
