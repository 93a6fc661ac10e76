//! `quetzal-agent`: the guest side of the guest agent. It finds the
//! virtio-serial port `org.qemu.guest_agent.0`, answers the QEMU guest
//! agent protocol's commands Quetzal uses on it (see [`commands`]), and
//! keeps serving across host reconnects. Beside it, on Quetzal's own
//! port `org.quetzal.agent.0`, it pushes telemetry, keeps declared
//! services running and takes a new identity after a clone (see
//! [`port`]). It is built statically (no
//! libc needed in the guest), so the same binary runs in `tiny`'s busybox
//! and in Debian.

mod commands;
mod filesystems;
mod identity;
mod port;
mod services;
mod telemetry;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use quetzal_qga::{Framer, MAX_MESSAGE, QGA_PORT};

fn main() {
    eprintln!(
        "quetzal-agent {}: looking for {QGA_PORT}",
        env!("CARGO_PKG_VERSION")
    );
    // Quetzal's own port, beside QGA: telemetry, the service watchdog
    // and the clone hook.
    let (events, reported) = std::sync::mpsc::sync_channel(32);
    let declared = services::start(events);
    std::thread::spawn(move || port::serve(declared, reported));
    loop {
        if let Some(device) = find_port(QGA_PORT)
            && let Err(err) = serve(&device)
        {
            eprintln!("quetzal-agent: {}: {err}", device.display());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The device of the virtio-serial port named `name`.
pub(crate) fn find_port(name: &str) -> Option<PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    ports.flatten().find_map(|port| {
        let named = std::fs::read_to_string(port.path().join("name")).ok()?;
        (named.trim() == name).then(|| PathBuf::from("/dev").join(port.file_name()))
    })
}

/// Answers commands on the port until it fails. While no host is
/// connected a read finds nothing: the agent waits and reads again.
fn serve(device: &std::path::Path) -> std::io::Result<()> {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)?;
    let mut writer = port.try_clone()?;
    let mut agent = commands::Agent::default();
    let mut framer = Framer::new(MAX_MESSAGE);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = port.read(&mut buffer)?;
        if read == 0 {
            // The host side is closed.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let objects = match framer.push(&buffer[..read]) {
            Ok(objects) => objects,
            Err(too_long) => {
                let refused = quetzal_qga::error(
                    "GenericError",
                    &format!("a command longer than {} bytes", too_long.limit),
                );
                writer.write_all(format!("{refused}\n").as_bytes())?;
                continue;
            }
        };
        for object in objects {
            if let Some(answer) = agent.handle(&object) {
                writer.write_all(&answer)?;
            }
        }
    }
}
