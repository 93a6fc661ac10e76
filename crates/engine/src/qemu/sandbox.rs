//! What the daemon prepares so that QEMU needs no privilege, as libvirt
//! does: its run directory and writable disks owned by the VM's own user,
//! its TAP devices opened here and handed over as file descriptors, and a
//! cgroup of its own with a memory limit. The child joins the cgroup and
//! drops to the VM's user between fork and exec ([`super::process`]); QEMU
//! itself then installs its seccomp filter (`-sandbox`, in [`super::argv`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

use super::{QemuError, RunPaths};
use crate::spec::{Ids, NicBackend, Ram, VmSpec};

/// The fd the first TAP device gets in QEMU (`-netdev tap,fd=3`), the next
/// one 4, and so on.
pub const FIRST_TAP_FD: i32 = 3;
/// Where handed-over fds wait in the parent: above every fd the child
/// renumbers to, so moving one never overwrites another.
const PARKED_FDS: i32 = 64;

/// What the child takes with it across exec.
#[derive(Debug, Default)]
pub struct Handover {
    /// The fds it gets from [`FIRST_TAP_FD`] on: its TAP devices, in the
    /// order of its TAP NICs, then the device state it restores.
    pub fds: Vec<OwnedFd>,
    /// Its cgroup's `cgroup.procs` files (one per hierarchy on cgroup
    /// v1), open for writing: the child joins by writing `0` to each.
    pub cgroup_procs: Vec<OwnedFd>,
    /// Who the child becomes.
    pub user: Option<Ids>,
    /// A group it is also in.
    pub extra_group: Option<u32>,
}

fn failed(path: &Path) -> impl Fn(std::io::Error) -> QemuError + '_ {
    move |source| QemuError::Confine {
        path: path.to_owned(),
        source,
    }
}

/// Prepares the run directory, the TAP devices and the cgroup for `spec`.
pub fn prepare(spec: &VmSpec, paths: &RunPaths) -> Result<Handover, QemuError> {
    let confinement = spec.confinement;
    if let Some(ids) = confinement.user {
        own(&paths.dir, ids)?;
        for disk in spec.disks.iter().filter(|disk| !disk.read_only) {
            std::os::unix::fs::lchown(&disk.path, Some(ids.uid), Some(ids.gid))
                .map_err(failed(&disk.path))?;
        }
    }
    if let Ram::Shared { file } = &spec.ram {
        share_ram(file, &paths.ram, confinement.user)?;
    }
    let mut fds = Vec::new();
    for nic in &spec.nics {
        if let NicBackend::Tap { ifname } = &nic.backend {
            fds.push(open_tap(ifname)?);
        }
    }
    // The device state to restore, after the TAP devices.
    if let Some(state) = &spec.restore {
        let file = std::fs::File::open(state).map_err(failed(state))?;
        fds.push(park(file.into()).map_err(failed(state))?);
    }
    let cgroup_procs = match confinement.memory_limit_mib {
        Some(limit) => cgroup::create(&paths.dir, limit, spec.cpu_pin.as_ref())?,
        None => Vec::new(),
    };
    Ok(Handover {
        fds,
        cgroup_procs,
        user: confinement.user,
        extra_group: confinement.extra_group,
    })
}

/// The fd a restored VM reads its device state from: the one after its
/// TAP devices'.
pub fn restore_fd(spec: &VmSpec) -> i32 {
    let taps = spec
        .nics
        .iter()
        .filter(|nic| matches!(nic.backend, NicBackend::Tap { .. }))
        .count();
    FIRST_TAP_FD + i32::try_from(taps).unwrap_or(0)
}

/// Makes the VM's RAM file, empty and its user's alone, and links it
/// from the run directory as `ram` (what says the file is the VM's own
/// and goes with it: see [`remove_ram`]).
fn share_ram(file: &Path, link: &Path, user: Option<Ids>) -> Result<(), QemuError> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(failed(dir))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(failed(file))?;
    if let Some(ids) = user {
        std::os::unix::fs::lchown(file, Some(ids.uid), Some(ids.gid)).map_err(failed(file))?;
    }
    match std::fs::remove_file(link) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(failed(link)(err)),
    }
    std::os::unix::fs::symlink(file, link).map_err(failed(link))
}

/// Removes a VM's own RAM file (and its link) once its process is gone;
/// a template's file, which a clone maps, is not linked and stays.
pub fn remove_ram(link: &Path) {
    if let Ok(file) = std::fs::read_link(link) {
        if let Err(err) = std::fs::remove_file(&file)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %file.display(), error = %err, "cannot remove a VM's RAM file");
        }
        let _ = std::fs::remove_file(link);
    }
}

/// Gives the run directory and everything directly in it to `ids`; the
/// directory is closed to everyone else (another VM cannot open its
/// disk, sockets or logs).
fn own(dir: &Path, ids: Ids) -> Result<(), QemuError> {
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(ids.uid), Some(ids.gid)).map_err(failed(path))
    };
    chown(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed(dir))?;
    for entry in std::fs::read_dir(dir).map_err(failed(dir))? {
        let path = entry.map_err(failed(dir))?.path();
        chown(&path)?;
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);

/// Makes (or attaches to) TAP device `ifname`; the device lives as long
/// as an fd of it is open — QEMU's, once handed over.
fn open_tap(ifname: &str) -> Result<OwnedFd, QemuError> {
    let tun = Path::new("/dev/net/tun");
    let name = ifname.as_bytes();
    if name.len() >= 16 {
        return Err(failed(tun)(std::io::Error::other(format!(
            "TAP name {ifname} is longer than 15 bytes"
        ))));
    }
    let raw = open(tun, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|errno| failed(tun)(errno.into()))?;
    // SAFETY: `raw` was just returned by open(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut request = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name);
    // SAFETY: TUNSETIFF reads a `struct ifreq` from the pointer, which
    // points at one laid out as the kernel expects and lives across the
    // call.
    unsafe { tunsetiff(fd.as_raw_fd(), &request) }.map_err(|errno| {
        failed(tun)(std::io::Error::other(format!(
            "TUNSETIFF {ifname}: {errno}"
        )))
    })?;
    park(fd).map_err(failed(tun))
}

/// Moves an fd above [`PARKED_FDS`] (close-on-exec still set).
fn park(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(PARKED_FDS))?;
    // SAFETY: `raw` was just returned by fcntl(F_DUPFD_CLOEXEC) and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub mod cgroup {
    //! A VM's own cgroup: its memory limit, its CPU weight and the CPUs
    //! it may run on. cgroup v2: one directory `/sys/fs/cgroup/quetzal/VM`
    //! with the `memory`, `cpu` and `cpuset` controllers; cgroup v1: one
    //! such directory in each of the `memory`, `cpu` and `cpuset`
    //! hierarchies, each joined through its own `cgroup.procs`.

    use super::*;
    use crate::spec::{CpuSet, CpuWeight};

    const ROOT: &str = "/sys/fs/cgroup";

    fn unified() -> bool {
        Path::new(ROOT).join("cgroup.controllers").exists()
    }

    /// The `quetzal` directories VMs' cgroups are made in: the memory
    /// one first.
    fn parents() -> Vec<PathBuf> {
        if unified() {
            vec![Path::new(ROOT).join("quetzal")]
        } else {
            ["memory", "cpu", "cpuset"]
                .iter()
                .map(|controller| Path::new(ROOT).join(controller).join("quetzal"))
                .collect()
        }
    }

    /// The cgroup's name: the VM's directory name and a hash of its path
    /// (unique per directory, so two nodes on one host never share one).
    fn name(run_dir: &Path) -> String {
        let hash: String = Sha256::digest(run_dir.as_os_str().as_encoded_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name}-{hash}")
    }

    /// The VM's cgroup directories, the memory one first.
    fn dirs(run_dir: &Path) -> Vec<PathBuf> {
        let name = name(run_dir);
        parents()
            .into_iter()
            .map(|parent| parent.join(&name))
            .collect()
    }

    /// The cgroup of the VM whose run directory is `run_dir` (its memory
    /// controller's, on v1).
    pub fn path(run_dir: &Path) -> PathBuf {
        dirs(run_dir).swap_remove(0)
    }

    /// The file that holds a cgroup's memory limit.
    pub fn limit_file(cgroup: &Path) -> PathBuf {
        cgroup.join(if unified() {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        })
    }

    /// The file that holds the VM's CPU weight (`cpu.weight`, or v1's
    /// `cpu.shares`).
    pub fn cpu_file(run_dir: &Path) -> PathBuf {
        let name = name(run_dir);
        if unified() {
            Path::new(ROOT)
                .join("quetzal")
                .join(name)
                .join("cpu.weight")
        } else {
            Path::new(ROOT)
                .join("cpu/quetzal")
                .join(name)
                .join("cpu.shares")
        }
    }

    /// The file that holds the CPUs the VM's process may run on.
    pub fn cpus_file(run_dir: &Path) -> PathBuf {
        let name = name(run_dir);
        let dir = if unified() {
            Path::new(ROOT).join("quetzal").join(name)
        } else {
            Path::new(ROOT).join("cpuset/quetzal").join(name)
        };
        dir.join("cpuset.cpus")
    }

    fn write(file: &Path, value: &str) -> Result<(), QemuError> {
        std::fs::write(file, value).map_err(failed(file))
    }

    /// A v1 cpuset cgroup takes tasks only once it has CPUs and memory
    /// nodes: `dir` gets its parent's where it has none.
    fn inherit_cpuset(dir: &Path) -> Result<(), QemuError> {
        let parent = dir.parent().unwrap_or(dir);
        for knob in ["cpuset.cpus", "cpuset.mems"] {
            let own = std::fs::read_to_string(dir.join(knob)).unwrap_or_default();
            if own.trim().is_empty() {
                let theirs = std::fs::read_to_string(parent.join(knob))
                    .map_err(failed(&parent.join(knob)))?;
                write(&dir.join(knob), theirs.trim())?;
            }
        }
        Ok(())
    }

    /// Makes the cgroup (or takes the one a previous run left) with a
    /// memory limit of `limit_mib`, the normal CPU weight, and `cpus` (or
    /// all the host's); the `cgroup.procs` of each of its directories,
    /// open for writing.
    pub fn create(
        run_dir: &Path,
        limit_mib: u64,
        cpus: Option<&CpuSet>,
    ) -> Result<Vec<OwnedFd>, QemuError> {
        let dirs = dirs(run_dir);
        if unified() {
            // Children of the root and of quetzal/ get the controllers.
            let parent = Path::new(ROOT).join("quetzal");
            std::fs::create_dir_all(&parent).map_err(failed(&parent))?;
            for control in [Path::new(ROOT).to_owned(), parent] {
                write(
                    &control.join("cgroup.subtree_control"),
                    "+memory +cpu +cpuset",
                )?;
            }
        }
        let mut procs = Vec::new();
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(failed(dir))?;
            if dir.join("cpuset.cpus").exists() {
                if !unified() {
                    inherit_cpuset(dir.parent().unwrap_or(dir))?;
                    inherit_cpuset(dir)?;
                }
                if let Some(cpus) = cpus {
                    write(&dir.join("cpuset.cpus"), &cpus.to_string())?;
                }
            }
            if dir.join("memory.max").exists() || dir.join("memory.limit_in_bytes").exists() {
                write(&limit_file(dir), &(limit_mib << 20).to_string())?;
            }
            let file = dir.join("cgroup.procs");
            let raw = open(&file, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|errno| failed(&file)(errno.into()))?;
            // SAFETY: `raw` was just returned by open(2) and nothing else owns it.
            procs.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        set_cpu_weight(run_dir, CpuWeight::NORMAL).map_err(failed(&cpu_file(run_dir)))?;
        Ok(procs)
    }

    /// Gives the VM's cgroup `weight`.
    pub fn set_cpu_weight(run_dir: &Path, weight: CpuWeight) -> std::io::Result<()> {
        let value = if unified() {
            weight.get().to_string()
        } else {
            weight.shares().to_string()
        };
        std::fs::write(cpu_file(run_dir), value)?;
        balance_parent();
        Ok(())
    }

    /// The `quetzal` group's own weight is the sum of its VMs': the
    /// scheduler weighs a group against the host's other processes as one
    /// entity, so at the default weight every VM together would get what
    /// one busy process gets. Summed, each VM competes with the host like
    /// a process of its weight. Serialized in the process, so two VMs
    /// changing at once never leave a stale sum.
    fn balance_parent() {
        static BALANCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _held = BALANCE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (parent, knob, bounds) = if unified() {
            (Path::new(ROOT).join("quetzal"), "cpu.weight", (1, 10_000))
        } else {
            (
                Path::new(ROOT).join("cpu/quetzal"),
                "cpu.shares",
                (2, 262_144),
            )
        };
        let Ok(children) = std::fs::read_dir(&parent) else {
            return;
        };
        let sum: u64 = children
            .flatten()
            .filter_map(|child| std::fs::read_to_string(child.path().join(knob)).ok())
            .filter_map(|text| text.trim().parse::<u64>().ok())
            .sum();
        let value = sum.clamp(bounds.0, bounds.1);
        if let Err(err) = std::fs::write(parent.join(knob), value.to_string()) {
            tracing::warn!(cgroup = %parent.display(), %err, "cannot set the VMs' group weight");
        }
    }

    /// The VM's cgroup's CPU weight now; `None` without one.
    pub fn cpu_weight(run_dir: &Path) -> Option<CpuWeight> {
        let text = std::fs::read_to_string(cpu_file(run_dir)).ok()?;
        let value: u64 = text.trim().parse().ok()?;
        let weight = if unified() { value } else { value * 100 / 1024 };
        CpuWeight::new(u32::try_from(weight).ok()?)
    }

    /// Removes the VM's cgroup once its process is gone; false while a
    /// process is still in it (one that just ended can take a moment to
    /// leave).
    pub fn remove(run_dir: &Path) -> bool {
        let mut gone = true;
        for dir in dirs(run_dir) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::debug!(cgroup = %dir.display(), %err, "cgroup kept");
                    gone = false;
                }
            }
        }
        if gone {
            balance_parent();
        }
        gone
    }

    /// [`remove`] for every VM directory under `vms` (their processes were
    /// just killed: each is waited for up to five seconds to leave).
    pub fn remove_all_blocking(vms: &Path) {
        let Ok(entries) = std::fs::read_dir(vms) else {
            return;
        };
        for entry in entries.flatten() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !remove(&entry.path()) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    /// [`remove`], trying again for up to two seconds while the ended
    /// process is still leaving.
    pub async fn remove_when_left(run_dir: &Path) {
        for _ in 0..100 {
            if remove(run_dir) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::warn!(cgroup = %path(run_dir).display(), "cannot remove the VM's cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_directory_has_its_own_cgroup() {
        let one = cgroup::path(Path::new("/var/lib/quetzal/vms/web"));
        let two = cgroup::path(Path::new("/srv/other-node/vms/web"));

        assert_ne!(one, two);
        assert!(
            one.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("web-")
        );
        assert_eq!(one, cgroup::path(Path::new("/var/lib/quetzal/vms/web")));
    }

    #[test]
    fn the_ifreq_is_laid_out_as_the_kernel_reads_it() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
