//! `guest-ping` on its own: an agent and its virtio-serial port, without
//! the node or its API in the way. Plain QEMU boots an overlay of an
//! image's disk with the QGA port on a Unix socket (and Quetzal's own
//! port, as the node gives it); the bench synchronises with
//! `guest-sync-delimited` as quetzald does, then times `guest-ping`
//! round trips one after the other.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_engine::spec::DiskFormat;
use quetzal_qga::{Framer, MAX_MESSAGE, QGA_PORT, SYNC_DELIMITER};

/// How long a guest has to boot to its agent.
const READY: Duration = Duration::from_secs(400);

/// Boots `disk` (of `format`) in plain QEMU under `scratch` and times
/// `count` pings once its agent answers.
pub(crate) fn pings(
    disk: &Path,
    format: DiskFormat,
    scratch: &Path,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let overlay = scratch.join("ping.qcow2");
    let _ = std::fs::remove_file(&overlay);
    quetzal_engine::disk::create_overlay(disk, format, &overlay)?;
    let socket = scratch.join("qga.sock");
    let port = scratch.join("port.sock");
    let mut qemu = Qemu(plain_qemu(&overlay, &socket, &port).spawn()?);
    let mut agent = Agent::connect(&socket, &mut qemu)?;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        agent.send(br#"{"execute":"guest-ping"}"#)?;
        let answer = agent.next(Duration::from_secs(10))?;
        times.push(start.elapsed());
        // `{"return": {}}`; a late echo of a sync would be a number.
        if !answer["return"].is_object() {
            bail!("guest-ping answered {answer}");
        }
    }
    drop(agent);
    drop(qemu);
    std::fs::remove_file(&overlay)?;
    Ok(times)
}

fn plain_qemu(overlay: &Path, socket: &Path, port: &Path) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", "pc", "-accel", "tcg", "-smp", "2", "-m", "1024"])
        .args(["-serial", "null", "-nic", "none"])
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", overlay.display()))
        .args(["-device", "virtio-serial-pci,id=vser0"]);
    for (id, path, name) in [
        ("qga0", socket, QGA_PORT),
        ("port0", port, quetzal_qga::port::QUETZAL_PORT),
    ] {
        command
            .arg("-chardev")
            .arg(format!(
                "socket,id={id},path={},server=on,wait=off",
                path.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser0.0,chardev={id},name={name}"
            ));
    }
    command.stdin(Stdio::null()).stdout(Stdio::null());
    command
}

/// A QEMU that is killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Agent {
    stream: UnixStream,
    framer: Framer,
    ready: Vec<serde_json::Value>,
}

impl Agent {
    /// Connects to the QGA socket and synchronises with the agent once it
    /// runs: `guest-sync-delimited` every second until one is echoed.
    fn connect(socket: &Path, qemu: &mut Qemu) -> anyhow::Result<Self> {
        let deadline = Instant::now() + READY;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    if let Some(status) = qemu.0.try_wait()? {
                        bail!("QEMU ended: {status}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => return Err(err).context("QEMU's agent socket"),
            }
        };
        let mut agent = Agent {
            stream,
            framer: Framer::new(MAX_MESSAGE),
            ready: Vec::new(),
        };
        for id in 1u64.. {
            if Instant::now() > deadline {
                bail!("no agent answered within {READY:?}");
            }
            let mut sync = vec![SYNC_DELIMITER];
            sync.extend_from_slice(
                serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                    .to_string()
                    .as_bytes(),
            );
            agent.send(&sync)?;
            // Syncs sent before the guest opened its port arrive together
            // once it does: their echoes are read past, up to this one's.
            let wait = Instant::now() + Duration::from_secs(1);
            loop {
                let left = wait.saturating_duration_since(Instant::now());
                match agent.next(left) {
                    Ok(answer) if answer["return"] == id => return Ok(agent),
                    Ok(_) => {}
                    Err(err) if is_timeout(&err) => break,
                    Err(err) => return Err(err),
                }
            }
        }
        unreachable!("ids do not run out")
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// The next whole object the agent sends, within `timeout`.
    fn next(&mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 4096];
        loop {
            if !self.ready.is_empty() {
                return Ok(self.ready.remove(0));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::from(ErrorKind::TimedOut).into());
            }
            self.stream.set_read_timeout(Some(left))?;
            let n = self.stream.read(&mut buffer)?;
            if n == 0 {
                bail!("the agent's socket closed");
            }
            let objects = self
                .framer
                .push(&buffer[..n])
                .map_err(|too_long| anyhow::anyhow!("an answer past {} bytes", too_long.limit))?;
            for object in objects {
                self.ready.push(serde_json::from_slice(&object)?);
            }
        }
    }
}

fn is_timeout(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|e| matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock))
}
