//! Disk images through `qemu-img`: probing a format, creating a qcow2
//! overlay on a base image so the base is never written.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::spec::{DiskFormat, SpecError, check_readable};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("qemu-img is not installed (install the qemu-utils package)")]
    NoQemuImg,
    #[error(transparent)]
    Unreadable(#[from] SpecError),
    #[error("{path}: qemu-img cannot open it: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path}: unsupported disk format '{format}' (use qcow2 or raw)")]
    Format { path: PathBuf, format: String },
    #[error("cannot create overlay {path}: {message}")]
    Overlay { path: PathBuf, message: String },
    #[error("no space left for {path}: {message}")]
    NoSpace { path: PathBuf, message: String },
    #[error("the copy to {path} was cancelled")]
    Cancelled { path: PathBuf },
}

impl DiskError {
    /// qemu-img's failure at `path` from its last line of stderr: the
    /// errno text of ENOSPC (qemu-img reports errors as text only) is
    /// the one a caller acts on differently.
    fn failed(path: &Path, message: String) -> Self {
        if crate::says_no_space(&message) {
            DiskError::NoSpace {
                path: path.to_owned(),
                message,
            }
        } else {
            DiskError::Overlay {
                path: path.to_owned(),
                message,
            }
        }
    }
}

#[derive(Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "full-backing-filename")]
    backing: Option<String>,
    /// Internal snapshots.
    #[serde(default)]
    snapshots: Vec<SnapshotInfo>,
}

#[derive(Deserialize)]
struct SnapshotInfo {
    name: String,
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<std::process::Output, DiskError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => DiskError::NoQemuImg,
            _ => DiskError::Open {
                path: PathBuf::new(),
                message: err.to_string(),
            },
        })
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .trim()
        .to_owned()
}

/// The format of an existing image, and its backing file if any.
pub fn probe(path: &Path) -> Result<(DiskFormat, Option<PathBuf>), DiskError> {
    let info = info(path)?;
    let format = match info.format.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        other => {
            return Err(DiskError::Format {
                path: path.to_owned(),
                format: other.to_owned(),
            });
        }
    };
    Ok((format, info.backing.map(PathBuf::from)))
}

/// The names of a disk's internal snapshots (readable while a VM has the
/// disk open).
pub fn snapshot_names(path: &Path) -> Result<Vec<String>, DiskError> {
    Ok(info(path)?.snapshots.into_iter().map(|s| s.name).collect())
}

/// The size the guest sees, in bytes.
pub fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    Ok(info(path)?.virtual_size)
}

fn info(path: &Path) -> Result<Info, DiskError> {
    check_readable("disk", path)?;
    let output = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        path.as_os_str(),
    ])?;
    if !output.status.success() {
        return Err(DiskError::Open {
            path: path.to_owned(),
            message: last_line(&output.stderr),
        });
    }
    serde_json::from_slice(&output.stdout).map_err(|err| DiskError::Open {
        path: path.to_owned(),
        message: err.to_string(),
    })
}

/// Creates a qcow2 overlay at `overlay` whose backing file is `base`
/// (absolute), of the base's size. Writes go to the overlay only.
pub fn create_overlay(
    base: &Path,
    base_format: DiskFormat,
    overlay: &Path,
) -> Result<(), DiskError> {
    create_overlay_sized(base, base_format, overlay, None)
}

/// Like [`create_overlay`], with the guest seeing `size_mib` (not smaller
/// than the base) when given.
pub fn create_overlay_sized(
    base: &Path,
    base_format: DiskFormat,
    overlay: &Path,
    size_mib: Option<u64>,
) -> Result<(), DiskError> {
    let failed = |message: String| DiskError::Overlay {
        path: overlay.to_owned(),
        message,
    };
    let base = std::fs::canonicalize(base).map_err(|err| failed(err.to_string()))?;
    let size = size_mib.map(|mib| format!("{mib}M"));
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        "-F".as_ref(),
        base_format.as_str().as_ref(),
        overlay.as_os_str(),
    ];
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    let output = qemu_img(&args)?;
    if output.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(overlay);
        Err(failed(last_line(&output.stderr)))
    }
}

/// Copies `from` into a new qcow2 image at `to` whose backing file is
/// `keep_base`: only what differs from the base is copied, and the result
/// no longer depends on `from` or anything between it and the base.
/// `progress` hears the percentage done as it grows; when it answers
/// `false` the copy stops, the partial copy is removed and the answer is
/// [`DiskError::Cancelled`].
pub fn copy_onto_base(
    from: &Path,
    keep_base: &Path,
    to: &Path,
    progress: &mut dyn FnMut(u32) -> bool,
) -> Result<(), DiskError> {
    use std::io::Read;
    let failed = |message: String| DiskError::failed(to, message);
    let base = std::fs::canonicalize(keep_base).map_err(|err| failed(err.to_string()))?;
    let mut child = Command::new("qemu-img")
        .args(["convert", "-p", "-O", "qcow2", "-B"])
        .arg(&base)
        .args(["-F", "qcow2"])
        .arg(from)
        .arg(to)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => DiskError::NoQemuImg,
            _ => failed(err.to_string()),
        })?;
    // `-p` prints "    (12.50/100%)" and a carriage return as it goes.
    let mut out = child.stdout.take().expect("piped");
    let mut pending = String::new();
    let mut buf = [0u8; 256];
    let mut reported = None;
    let mut cancelled = false;
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find(['\r', '\n']) {
            if let Some(percent) = progress_percent(&pending[..end])
                && reported.is_none_or(|last| percent > last)
            {
                reported = Some(percent);
                if !progress(percent) {
                    cancelled = true;
                }
            }
            pending.drain(..=end);
        }
        if cancelled {
            let _ = child.kill();
            break;
        }
    }
    let mut stderr = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    let status = child.wait().map_err(|err| failed(err.to_string()))?;
    if cancelled {
        let _ = std::fs::remove_file(to);
        return Err(DiskError::Cancelled {
            path: to.to_owned(),
        });
    }
    if status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(to);
        Err(failed(last_line(&stderr)))
    }
}

/// The whole percent in a `qemu-img -p` progress line.
fn progress_percent(line: &str) -> Option<u32> {
    let inside = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    let whole = inside.split('.').next()?;
    whole.parse().ok().filter(|p| *p <= 100)
}

/// What `qemu-img snapshot` does to a stopped VM's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    Create,
    /// Reverts the disk to the snapshot.
    Apply,
    Delete,
}

/// An internal snapshot of a disk no QEMU has open (disk only, no memory).
pub fn snapshot_offline(disk: &Path, action: SnapshotAction, tag: &str) -> Result<(), DiskError> {
    let flag = match action {
        SnapshotAction::Create => "-c",
        SnapshotAction::Apply => "-a",
        SnapshotAction::Delete => "-d",
    };
    let output = qemu_img(&[
        "snapshot".as_ref(),
        flag.as_ref(),
        tag.as_ref(),
        disk.as_os_str(),
    ])?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DiskError::Open {
            path: disk.to_owned(),
            message: last_line(&output.stderr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_host_disk_is_its_own_kind_of_failure() {
        let full = "qemu-img: error while writing at byte 2097152: No space left on device";

        let failed = DiskError::failed(Path::new("/vms/c/root.qcow2"), full.to_owned());

        assert!(matches!(failed, DiskError::NoSpace { .. }), "{failed:?}");
        let other = DiskError::failed(Path::new("/x"), "Permission denied".to_owned());
        assert!(matches!(other, DiskError::Overlay { .. }), "{other:?}");
        let refused = crate::QemuError::Qmp(crate::qmp::QmpError::Refused {
            command: "snapshot-save",
            class: "GenericError".to_owned(),
            desc: "Error while writing VM state: No space left on device".to_owned(),
        });
        assert!(crate::Failure::no_space(&refused));
    }

    #[test]
    fn reads_qemu_img_progress_lines() {
        assert_eq!(progress_percent("    (12.50/100%)"), Some(12));
        assert_eq!(progress_percent("(100.00/100%)"), Some(100));
        assert_eq!(progress_percent("    (0.00/100%)"), Some(0));
        assert_eq!(progress_percent("qemu-img: error"), None);
        assert_eq!(progress_percent("(250.00/100%)"), None);
    }
}
