//! `quetzal-bench dashboard`: starts quetzald with its TCP listener on a
//! scratch data directory and runs web/bench/dashboard.mjs against it
//! (Chromium must be installed, and web/node_modules: scripts/setup).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::node::{Daemon, scratch_data};

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let (_scratch, data) = scratch_data()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let listen = addr.to_string();
    let daemon = Daemon::start_with(&bin.join("quetzald"), &data, &["--listen", &listen])?;
    let token = std::fs::read_to_string(data.join("token")).context("quetzald's token")?;
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let status = Command::new("node")
        .arg("bench/dashboard.mjs")
        .current_dir(&web)
        .env("QUETZAL_URL", format!("https://{listen}"))
        .env("QUETZAL_TOKEN", token.trim())
        .env("QUETZAL_CERT", data.join("tls/node.crt"))
        .env("NODE_EXTRA_CA_CERTS", data.join("tls/node.crt"))
        .env("RUNS", runs.to_string())
        .status()
        .context("cannot run node")?;
    drop(daemon);
    if !status.success() {
        bail!("web/bench/dashboard.mjs failed ({status})");
    }
    Ok(())
}
