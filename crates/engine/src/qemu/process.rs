//! Starting the QEMU process so that it is owned, logged and detached.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid, setsid};

use super::QemuError;

/// Whether QEMU outlives the program that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// QEMU runs in its own session and survives our exit or crash: a daemon
    /// re-attaches to it later through its sockets.
    Detached,
    /// QEMU is killed when the thread that started it dies (`quetzal run`:
    /// a foreground VM must not outlive its terminal program, even on
    /// SIGKILL).
    TiedToCaller,
}

/// Finds `binary` on PATH (or checks it, when it is a path).
pub fn resolve(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_owned());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    })
}

pub fn spawn(
    binary: &Path,
    args: &[OsString],
    log: &Path,
    lifetime: Lifetime,
) -> Result<tokio::process::Child, QemuError> {
    let spawn_failed = |source| QemuError::Spawn {
        binary: binary.to_owned(),
        source,
    };
    let log = File::create(log).map_err(spawn_failed)?;
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_failed)?)
        .stderr(log);
    let parent = Pid::this();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (setsid, prctl, getppid); it
    // allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            // Its own session: a Ctrl-C on our terminal does not reach QEMU.
            setsid()?;
            if lifetime == Lifetime::TiedToCaller {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before prctl took effect.
                if getppid() != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
            }
            Ok(())
        });
    }
    command.spawn().map_err(spawn_failed)
}

/// The last few lines of QEMU's log, on one line, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "no output".to_owned()
    } else {
        tail
    }
}
