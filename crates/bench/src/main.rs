//! Benchmark programs: Quetzal beside its reference, measured in the same
//! run, printed as Markdown tables (median and spread).
//!
//! - `quetzal-bench boot`: `quetzal run` against plain QEMU.
//! - `quetzal-bench node`: quetzald against libvirt 9 + QEMU.
//! - `quetzal-bench clones`: templates, clones, snapshots against libvirt
//!   and qemu-img.
//! - `quetzal-bench dashboard`: the dashboard's list render and event
//!   latency in Chromium (web/bench/dashboard.mjs).
//! - `quetzal-bench tls`: the API over HTTPS against plain HTTP on the
//!   Unix socket.
//! - `quetzal-bench agent`: the guest agent's readiness and round trip.
//! - `quetzal-bench debian`: the debian image's boot to login, agent and
//!   SSH, and exec through quetzal-agent against stock qemu-guest-agent.
//! - `quetzal-bench instant`: instant clones of a warm template against a
//!   cold start and libvirt's define + start; clones per second; memory.
//! - `quetzal-bench console`: the graphical console's frames per second
//!   and input-to-screen latency in Chromium, against noVNC through
//!   websockify (web/bench/console.mjs).
//!
//! Build the image first (`quetzal image build`); the data directory is
//! `$QUETZAL_DATA_DIR` or the default, as for `quetzal`.

mod agent;
mod boot;
mod clones;
mod console;
mod dashboard;
mod debian;
mod instant;
mod node;
mod ping;
mod stats;
mod tls;

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: quetzal-bench boot|node|clones|dashboard|tls|agent|debian|instant [--runs N]";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut runs = 10usize;
    let mut which = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "boot" | "node" | "clones" | "dashboard" | "tls" | "agent" | "debian" | "instant"
            | "console" => which = Some(arg),
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("the bench binary has a directory")?
        .to_owned();
    match which.as_deref() {
        Some("boot") => boot::run(runs, &bin.join("quetzal")),
        Some("node") => node::run(runs, &bin),
        Some("clones") => clones::run(runs, &bin),
        Some("dashboard") => dashboard::run(runs, &bin),
        Some("tls") => tls::run(runs, &bin),
        Some("agent") => agent::run(runs, &bin),
        Some("debian") => debian::run(runs, &bin),
        Some("instant") => instant::run(runs, &bin),
        Some("console") => console::run(runs, &bin),
        _ => bail!(USAGE),
    }
}
