//! `quetzal-bench console`: the graphical console in headless Chromium,
//! through quetzald (its HTTPS WebSocket relay and the dashboard's
//! full-window desktop page) against noVNC connected to the same QEMU
//! through websockify (Debian's, on the VM's VNC socket: the plain
//! reference), in the same run, one client connected at a time:
//!
//! - frames per second of a changing 1024×768 screen (a maximized
//!   terminal printing `seq`): distinct screen states the page shows;
//! - input to screen: a key pressed in the page until the echoed
//!   character changes the canvas.
//!
//! web/bench/console.mjs does the measuring. Needs the desktop image
//! (`quetzal image build desktop`) and websockify (`scripts/bench-setup`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_image::ImageStore;

use crate::node::{Daemon, PREFIX, scratch_data};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const X: &str = "--setenv=DISPLAY=:0";
const XAUTH: &str = "--setenv=XAUTHORITY=/home/debian/.Xauthority";

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    ImageStore::new(&quetzal_image::data_dir())
        .get("desktop")
        .context("build it first: quetzal image build desktop")?;
    let (_scratch, data) = scratch_data()?;
    let listen = free_port()?;
    let daemon = Daemon::start_with(&bin.join("quetzald"), &data, &["--listen", &listen])?;
    let vm = format!("{PREFIX}-console");
    let result = measure(runs, &daemon, &data, &listen, &vm);
    drop(daemon);
    result
}

fn free_port() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

fn call(daemon: &Daemon, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let (status, answer) = daemon.request(method, path, body)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: {status} {answer}");
    }
    Ok(answer)
}

/// Runs `args` in the guest; whether it exited 0.
fn exec(daemon: &Daemon, vm: &str, args: &[&str]) -> anyhow::Result<bool> {
    let body = serde_json::json!({ "command": args[0], "args": &args[1..] }).to_string();
    let (status, answer) =
        daemon.request("POST", &format!("/api/v1/vms/{vm}/exec"), Some(&body))?;
    if status != 200 {
        return Ok(false);
    }
    let done: serde_json::Value = serde_json::from_str(&answer)?;
    Ok(done["exit_code"] == 0)
}

fn wait_until(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > BOOT_TIMEOUT {
            bail!("{what}: not within {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn measure(
    runs: usize,
    daemon: &Daemon,
    data: &Path,
    listen: &str,
    vm: &str,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "name": vm, "image": "desktop", "memory_mib": 1024, "cpus": 1 })
        .to_string();
    call(daemon, "POST", "/api/v1/vms", Some(&body))?;
    call(daemon, "POST", &format!("/api/v1/vms/{vm}/start"), None)?;
    wait_until("the desktop session", || {
        exec(daemon, vm, &["pgrep", "-u", "debian", "-x", "xfdesktop"])
    })?;
    // The terminal the keys are typed into.
    let terminal = [
        "systemd-run",
        "--uid=debian",
        X,
        XAUTH,
        "xfce4-terminal",
        "--disable-server",
        "--maximize",
    ];
    if !exec(daemon, vm, &terminal)? {
        bail!("cannot start a terminal in the guest");
    }
    wait_until("the terminal's window", || {
        exec(
            daemon,
            vm,
            &[
                "runuser",
                "-u",
                "debian",
                "--",
                "env",
                "DISPLAY=:0",
                "XAUTHORITY=/home/debian/.Xauthority",
                "xdotool",
                "search",
                "--onlyvisible",
                "--class",
                "xfce4-terminal",
            ],
        )
    })?;

    let page = tempfile::tempdir()?;
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    std::fs::copy(web.join("bench/novnc.html"), page.path().join("index.html"))?;
    std::os::unix::fs::symlink(
        web.join("node_modules/@novnc/novnc").canonicalize()?,
        page.path().join("novnc"),
    )?;
    let reference = free_port()?;
    let socket = data.join("vms").join(vm).join("vnc.sock");
    let websockify = Websockify(
        Command::new("websockify")
            .arg("--web")
            .arg(page.path())
            .arg(format!("--unix-target={}", socket.display()))
            .arg(&reference)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("websockify (scripts/bench-setup installs it)")?,
    );

    let token = std::fs::read_to_string(data.join("token")).context("quetzald's token")?;
    let status = Command::new("node")
        .arg("bench/console.mjs")
        .current_dir(&web)
        .env("QUETZAL_URL", format!("https://{listen}"))
        .env("QUETZAL_TOKEN", token.trim())
        .env("QUETZAL_CERT", data.join("tls/node.crt"))
        .env("NODE_EXTRA_CA_CERTS", data.join("tls/node.crt"))
        .env("QUETZAL_VM", vm)
        .env("REFERENCE_URL", format!("http://{reference}/"))
        .env("RUNS", runs.to_string())
        .status()
        .context("cannot run node")?;
    drop(websockify);
    let _ = call(
        daemon,
        "POST",
        &format!("/api/v1/vms/{vm}/force-stop"),
        None,
    );
    let _ = call(daemon, "DELETE", &format!("/api/v1/vms/{vm}"), None);
    if !status.success() {
        bail!("web/bench/console.mjs failed ({status})");
    }
    Ok(())
}

/// websockify, ended with the bench.
struct Websockify(Child);

impl Drop for Websockify {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
