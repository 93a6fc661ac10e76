//! The guest's filesystems: `guest-get-fsinfo` (how full each is), and
//! `guest-fsfreeze-freeze`, `-thaw` and `-status`: every block-device
//! filesystem frozen (`FIFREEZE`) so a snapshot taken meanwhile holds
//! them consistent, and thawed (`FITHAW`) on request — or by the agent
//! itself after [`AUTO_THAW`], so a host that died or forgot can never
//! leave the guest frozen.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest a freeze lasts without a thaw.
pub const AUTO_THAW: Duration = Duration::from_secs(10);

/// Filesystems that can be frozen, on a block device.
const FREEZABLE: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs"];

nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

#[derive(Debug, Default)]
struct Frozen {
    /// Each frozen filesystem's mount point, open.
    mounts: Vec<std::fs::File>,
    /// Tells a freeze from a later one, for its auto-thaw.
    generation: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Freezer {
    frozen: Arc<Mutex<Frozen>>,
}

impl Freezer {
    /// Freezes every freezable filesystem, innermost mounts first; the
    /// number frozen. A failure thaws what was frozen.
    pub fn freeze(&self) -> Result<usize, String> {
        let mut frozen = self.frozen.lock().expect("never poisoned");
        if !frozen.mounts.is_empty() {
            return Err("the filesystems are frozen already".to_owned());
        }
        let table = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|err| format!("/proc/self/mounts: {err}"))?;
        for mount in freezable(&table).into_iter().rev() {
            let done = std::fs::File::open(&mount)
                .map_err(|err| err.to_string())
                .and_then(|file| {
                    let mut arg: nix::libc::c_int = 0;
                    // SAFETY: FIFREEZE on an open directory's fd, with a
                    // valid pointer to an int the kernel ignores.
                    unsafe { fifreeze(file.as_raw_fd(), &raw mut arg) }
                        .map(|_| file)
                        .map_err(|errno| errno.to_string())
                });
            match done {
                Ok(file) => frozen.mounts.push(file),
                Err(err) => {
                    thaw_all(&mut frozen);
                    return Err(format!("cannot freeze {}: {err}", mount.display()));
                }
            }
        }
        frozen.generation += 1;
        let count = frozen.mounts.len();
        let generation = frozen.generation;
        let this = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(AUTO_THAW);
            let mut frozen = this.frozen.lock().expect("never poisoned");
            if frozen.generation == generation {
                thaw_all(&mut frozen);
            }
        });
        Ok(count)
    }

    /// Thaws what is frozen; the number thawed.
    pub fn thaw(&self) -> usize {
        thaw_all(&mut self.frozen.lock().expect("never poisoned"))
    }

    pub fn status(&self) -> &'static str {
        if self
            .frozen
            .lock()
            .expect("never poisoned")
            .mounts
            .is_empty()
        {
            "thawed"
        } else {
            "frozen"
        }
    }
}

/// Thaws in the order frozen, outermost last.
fn thaw_all(frozen: &mut Frozen) -> usize {
    let count = frozen.mounts.len();
    for file in frozen.mounts.drain(..).rev() {
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: FITHAW on the fd FIFREEZE froze, with a valid pointer.
        let _ = unsafe { fithaw(file.as_raw_fd(), &raw mut arg) };
    }
    frozen.generation += 1;
    count
}

/// Each block-device filesystem and how full it is (`statvfs`), with
/// the device it is on.
pub fn usage() -> Vec<(String, quetzal_qga::port::Filesystem)> {
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    block_mounts(&table)
        .into_iter()
        .filter_map(|mount| {
            let stat = nix::sys::statvfs::statvfs(&mount.path).ok()?;
            let block = stat.fragment_size();
            let used = stat.blocks().saturating_sub(stat.blocks_free()) * block;
            let filesystem = quetzal_qga::port::Filesystem {
                mountpoint: mount.path.to_string_lossy().into_owned(),
                fs_type: mount.kind.to_owned(),
                used_bytes: used,
                total_bytes: stat.blocks() * block,
            };
            Some((
                mount.device.trim_start_matches("/dev/").to_owned(),
                filesystem,
            ))
        })
        .collect()
}

/// `guest-get-fsinfo`: [`usage`] as QGA answers it.
pub fn fsinfo() -> serde_json::Value {
    usage()
        .into_iter()
        .map(|(device, fs)| {
            serde_json::json!({
                "name": device,
                "mountpoint": fs.mountpoint,
                "type": fs.fs_type,
                "used-bytes": fs.used_bytes,
                "total-bytes": fs.total_bytes,
                "disk": [],
            })
        })
        .collect()
}

/// A filesystem mounted from a block device.
struct Mount<'a> {
    device: &'a str,
    path: PathBuf,
    kind: &'a str,
}

/// The filesystems in `/proc/self/mounts` order that sit on a block
/// device, each mount point once.
fn block_mounts(table: &str) -> Vec<Mount<'_>> {
    let mut found: Vec<Mount<'_>> = Vec::new();
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [device, path, kind, ..] = fields[..] else {
            continue;
        };
        // The kernel writes a space in a path as \040.
        let path = PathBuf::from(path.replace("\\040", " "));
        if device.starts_with("/dev/") && !found.iter().any(|m| m.path == path) {
            found.push(Mount { device, path, kind });
        }
    }
    found
}

/// The mount points whose filesystem can be frozen.
fn freezable(table: &str) -> Vec<PathBuf> {
    block_mounts(table)
        .into_iter()
        .filter(|mount| FREEZABLE.contains(&mount.kind))
        .map(|mount| mount.path)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezes_only_block_device_filesystems_each_once() {
        let table = "/dev/vda1 / ext4 rw,relatime 0 0\n\
                     proc /proc proc rw 0 0\n\
                     tmpfs /run tmpfs rw 0 0\n\
                     /dev/vdb /data xfs rw 0 0\n\
                     /dev/vda1 / ext4 rw 0 0\n\
                     /dev/sr0 /media/cd iso9660 ro 0 0\n\
                     /dev/vdc /my\\040data btrfs rw 0 0\n";

        assert_eq!(
            freezable(table),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/data"),
                PathBuf::from("/my data")
            ]
        );
    }
}
