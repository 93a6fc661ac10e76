//! The typed VM spec an engine boots. Every field is validated when it is
//! built, so an engine never sees zero CPUs or a kernel that is not a kernel.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::accel::Accel;

/// Most vCPUs QEMU's `pc` machine takes without an IOMMU for x2APIC.
pub const MAX_CPUS: u32 = 255;
/// Least memory a Linux guest can boot in.
pub const MIN_MEMORY_MIB: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, not {0}")]
    Cpus(u32),
    #[error("--memory must be at least {MIN_MEMORY_MIB} MiB, not {0} MiB")]
    MemoryTooSmall(u64),
    #[error("--memory {requested} MiB is more than this host has ({host} MiB)")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("cannot read {what} {path}: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel (no bzImage header and not ELF)")]
    NotAKernel { path: PathBuf },
    #[error(
        "invalid VM name '{0}': use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
    )]
    Name(String),
    #[error("invalid MAC address '{0}'")]
    Mac(String),
    #[error("UEFI firmware is not installed: no {path} (install the ovmf package)")]
    NoFirmware { path: PathBuf },
    #[error(
        "invalid CPU list '{text}': give host CPUs as a list like 0-3,6 (this host has CPUs 0-{last})"
    )]
    CpuList { text: String, last: u32 },
}

/// Host CPUs, from a list such as `0-3,6` (the kernel's cpuset format):
/// distinct, in order, each one the host has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(Vec<u32>);

impl CpuSet {
    /// The longest list accepted (a bound on what a client makes us
    /// parse and store).
    const MAX_TEXT: usize = 256;

    pub fn parse(text: &str, host_cpus: u32) -> Result<Self, SpecError> {
        let invalid = || SpecError::CpuList {
            text: text.chars().take(64).collect(),
            last: host_cpus.saturating_sub(1),
        };
        if text.is_empty() || text.len() > Self::MAX_TEXT {
            return Err(invalid());
        }
        let mut cpus = Vec::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((first, last)) => (first, last),
                None => (part, part),
            };
            let number = |s: &str| {
                (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| s.parse::<u32>().ok())
                    .flatten()
            };
            let (Some(first), Some(last)) = (number(first), number(last)) else {
                return Err(invalid());
            };
            if first > last || last >= host_cpus {
                return Err(invalid());
            }
            cpus.extend(first..=last);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuSet(cpus))
    }

    pub fn cpus(&self) -> &[u32] {
        &self.0
    }
}

impl std::fmt::Display for CpuSet {
    /// The normalized list: ranges of consecutive CPUs, `0-3,6`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        let mut cpus = self.0.iter().copied().peekable();
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end += 1;
                cpus.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// A VM name: safe as a file name and in QEMU's `-name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmName(String);

impl VmName {
    pub fn new(name: &str) -> Result<Self, SpecError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if valid {
            Ok(VmName(name.to_owned()))
        } else {
            Err(SpecError::Name(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A vCPU count in `1..=MAX_CPUS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpus(u32);

impl Cpus {
    pub fn new(count: u32) -> Result<Self, SpecError> {
        if (1..=MAX_CPUS).contains(&count) {
            Ok(Cpus(count))
        } else {
            Err(SpecError::Cpus(count))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// Guest memory in MiB, at least [`MIN_MEMORY_MIB`] and at most the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMib(u64);

impl MemoryMib {
    pub fn new(mib: u64, host_mib: u64) -> Result<Self, SpecError> {
        if mib < MIN_MEMORY_MIB {
            Err(SpecError::MemoryTooSmall(mib))
        } else if mib > host_mib {
            Err(SpecError::MemoryTooLarge {
                requested: mib,
                host: host_mib,
            })
        } else {
            Ok(MemoryMib(mib))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// The kind of virtual machine board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Machine {
    /// The i440FX PC: SeaBIOS, ACPI, ISA serial. Boots reliably under TCG.
    #[default]
    Pc,
}

/// How a VM's boot starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads a kernel (and initrd): no firmware looks for a disk.
    Kernel(DirectBoot),
    /// SeaBIOS runs the first disk's boot sector.
    Bios,
    /// OVMF runs the first disk's EFI bootloader.
    Uefi(Uefi),
}

/// UEFI firmware (Debian's `ovmf`): its code, shared and read-only, and a
/// VM's own copy of its variable store (boot entries live there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uefi {
    code: PathBuf,
    vars: PathBuf,
}

/// Where Debian's `ovmf` puts the firmware (the 4 MiB build, for i440FX
/// and q35, without Secure Boot).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

impl Uefi {
    /// The installed firmware, with `vars` as the VM's variable store: made
    /// from the firmware's empty one the first time, kept afterwards.
    pub fn new(vars: &Path) -> Result<Self, SpecError> {
        Self::with_firmware(Path::new(OVMF_CODE), Path::new(OVMF_VARS), vars)
    }

    pub fn with_firmware(code: &Path, template: &Path, vars: &Path) -> Result<Self, SpecError> {
        for file in [code, template] {
            if !file.is_file() {
                return Err(SpecError::NoFirmware {
                    path: file.to_owned(),
                });
            }
        }
        if !vars.exists() {
            let partial = vars.with_extension("partial");
            std::fs::copy(template, &partial)
                .and_then(|_| std::fs::rename(&partial, vars))
                .map_err(|source| SpecError::Unreadable {
                    what: "UEFI variable store",
                    path: vars.to_owned(),
                    source,
                })?;
        }
        Ok(Uefi {
            code: code.to_owned(),
            vars: vars.to_owned(),
        })
    }

    pub fn code(&self) -> &Path {
        &self.code
    }

    pub fn vars(&self) -> &Path {
        &self.vars
    }
}

/// A kernel booted directly, without firmware looking for a boot disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    pub append: String,
}

impl DirectBoot {
    /// Checks that the kernel is readable and is a kernel, and that the initrd
    /// is readable.
    pub fn new(kernel: &Path, initrd: Option<&Path>, append: &str) -> Result<Self, SpecError> {
        let mut header = [0u8; 0x206];
        let mut file = File::open(kernel).map_err(|source| SpecError::Unreadable {
            what: "kernel",
            path: kernel.to_owned(),
            source,
        })?;
        let read = read_up_to(&mut file, &mut header).map_err(|source| SpecError::Unreadable {
            what: "kernel",
            path: kernel.to_owned(),
            source,
        })?;
        if !is_kernel(&header[..read]) {
            return Err(SpecError::NotAKernel {
                path: kernel.to_owned(),
            });
        }
        if let Some(initrd) = initrd {
            check_readable("initrd", initrd)?;
        }
        Ok(DirectBoot {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            append: append.to_owned(),
        })
    }

    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    pub fn initrd(&self) -> Option<&Path> {
        self.initrd.as_deref()
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A Linux bzImage has `HdrS` at offset 0x202; an ELF kernel starts with
/// `\x7fELF` (QEMU boots both).
fn is_kernel(header: &[u8]) -> bool {
    header.get(0x202..0x206) == Some(b"HdrS") || header.starts_with(b"\x7fELF")
}

/// Opens a file for reading to turn "missing" or "unreadable" into a clear
/// error before QEMU sees it.
pub fn check_readable(what: &'static str, path: &Path) -> Result<(), SpecError> {
    let unreadable = |source| SpecError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    if file.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(std::io::Error::other("it is a directory")));
    }
    Ok(())
}

/// A disk image format QEMU opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// A disk attached as virtio-blk, in the order given (the first is `vda`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac([u8; 6]);

impl Mac {
    /// A locally administered unicast address in QEMU's 52:54:00 range,
    /// with the last three bytes from `seed`.
    pub fn local(seed: u32) -> Self {
        let [_, a, b, c] = seed.to_be_bytes();
        Mac([0x52, 0x54, 0x00, a, b, c])
    }

    /// A locally administered unicast address from 46 random bits: the
    /// first byte's two low bits say "local" and "unicast".
    pub fn from_random(mut bytes: [u8; 6]) -> Self {
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        Mac(bytes)
    }
}

impl std::str::FromStr for Mac {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes: Vec<u8> = s
            .split(':')
            .map(|part| {
                (part.len() == 2)
                    .then(|| u8::from_str_radix(part, 16).ok())
                    .flatten()
            })
            .collect::<Option<_>>()
            .ok_or_else(|| SpecError::Mac(s.to_owned()))?;
        let bytes: [u8; 6] = bytes.try_into().map_err(|_| SpecError::Mac(s.to_owned()))?;
        Ok(Mac(bytes))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Where a NIC's packets go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NicBackend {
    /// QEMU's user-mode network (slirp): NAT and DHCP inside QEMU, no host
    /// setup, no inbound connections.
    User,
    /// A TAP device QEMU makes with this name (the host plugs it into a
    /// bridge); it goes away with QEMU.
    Tap { ifname: String },
}

/// A virtio-net NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub mac: Mac,
    pub backend: NicBackend,
}

/// Everything an engine needs to boot one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub name: VmName,
    pub cpus: Cpus,
    pub memory: MemoryMib,
    pub machine: Machine,
    pub accel: Accel,
    pub boot: Boot,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// A VGA display, served over VNC on the run directory's `vnc.sock`
    /// (the graphical console); without it the VM has no display.
    pub graphics: bool,
    /// Who its process runs as and what it may take of the host.
    pub confinement: Confinement,
    /// What holds the guest's RAM.
    pub ram: Ram,
    /// The generation id its guest sees (a GUID; its `vmgenid` device).
    /// A new one on every start tells a restored clone's kernel it is a
    /// copy (its RNG reseeds).
    pub generation_id: String,
    /// Device state saved by [`crate::EngineVm::save_state`] to restore
    /// before the vCPUs first run (an instant clone), in place of a boot.
    pub restore: Option<PathBuf>,
    /// Host CPUs its vCPU threads run on (vCPU n on the n-th of them,
    /// round the list), and its process's cgroup is confined to; none:
    /// wherever the host schedules them.
    pub cpu_pin: Option<CpuSet>,
}

/// What holds a VM's RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Ram {
    /// Memory of the engine's own process.
    #[default]
    Anonymous,
    /// A file of the VM's own (on tmpfs) that the guest writes through:
    /// a running VM with it can become a warm template. It goes when the
    /// VM's process does.
    Shared { file: PathBuf },
    /// A warm template's RAM file, mapped copy on write: the guest's
    /// writes stay private, the file is never written.
    Template { file: PathBuf },
}

/// Where the RAM files of every node's running VMs are: on tmpfs, so a
/// guest's writes to its RAM never go to a disk.
pub const RAM_ROOT: &str = "/dev/shm/quetzal";

/// The directory of the RAM files of the VMs of data directory `data`
/// (named by a hash of its path: every node on a host has its own).
pub fn ram_dir(data: &Path) -> PathBuf {
    use sha2::Digest;
    let id = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
    let id: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(RAM_ROOT).join(id)
}

/// A generation id (a random version 4 UUID) from `random`.
pub fn generation_id(mut random: [u8; 16]) -> String {
    random[6] = (random[6] & 0x0f) | 0x40;
    random[8] = (random[8] & 0x3f) | 0x80;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A new random generation id (from the kernel's random pool).
pub fn new_generation_id() -> std::io::Result<String> {
    let mut random = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(generation_id(random))
}

/// A user and group id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// How a VM's process is fenced off from the host and from the other
/// VMs, beyond the seccomp filter every one gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// The user and group it runs as, owning its run directory and
    /// writable disks (none: as whoever starts it).
    pub user: Option<Ids>,
    /// The memory limit of its own cgroup, MiB (none: no cgroup of its
    /// own).
    pub memory_limit_mib: Option<u64>,
    /// A group it is also in: [`Confinement::TEMPLATE_GID`] for a clone
    /// of a warm template (QEMU 7.2 opens the template's RAM file for
    /// writing even to map it copy on write).
    pub extra_group: Option<u32>,
}

/// A VM's share of the host's CPU time when CPUs are contended, in
/// cgroup v2's `cpu.weight` units (1-10000; cgroup v1's `cpu.shares` is
/// 1024 for [`CpuWeight::NORMAL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuWeight(u32);

impl CpuWeight {
    pub const NORMAL: CpuWeight = CpuWeight(100);
    /// A desktop its user is at: four times an idle one's share.
    pub const BOOSTED: CpuWeight = CpuWeight(400);

    pub fn new(weight: u32) -> Option<Self> {
        (1..=10_000).contains(&weight).then_some(CpuWeight(weight))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// cgroup v1's `cpu.shares` for it.
    pub fn shares(self) -> u64 {
        u64::from(self.0) * 1024 / 100
    }
}

impl Confinement {
    /// The first uid (and gid) of VMs: VM `id` runs as `FIRST_UID + id`.
    /// No account needs to exist for it; nothing else on a host uses this
    /// range by convention (it is past what `useradd` hands out).
    pub const FIRST_UID: u32 = 200_000;
    /// The group that may open warm templates' RAM files.
    pub const TEMPLATE_GID: u32 = Self::FIRST_UID - 1;

    /// What a node gives VM number `id` with `memory_mib` of RAM: when the
    /// node may (it runs as root), a uid and gid of its own and a cgroup
    /// whose limit is its RAM plus what the process needs beside it;
    /// otherwise nothing beyond the seccomp filter.
    pub fn for_vm(id: u32, memory_mib: u64, accel: Accel, privileged: bool) -> Self {
        if !privileged {
            return Confinement::default();
        }
        let ids = Ids {
            uid: Self::FIRST_UID.saturating_add(id),
            gid: Self::FIRST_UID.saturating_add(id),
        };
        Confinement {
            user: Some(ids),
            memory_limit_mib: Some(memory_mib + overhead_mib(memory_mib, accel)),
            extra_group: None,
        }
    }
}

/// The translation cache QEMU gets under TCG (`tb-size`, MiB). QEMU 7.2's
/// default is 1 GiB, filled as code is translated: a Debian boot filled
/// enough of it to pass a 1 GiB guest's cgroup limit, and the kernel killed
/// the VM. Bounded, it is flushed and refilled instead.
pub const TCG_CACHE_MIB: u64 = 256;

/// What a VM's process needs beyond its guest's RAM: the device model and
/// its buffers (a quarter of the RAM, at least 256 MiB), and under TCG the
/// translation cache.
pub fn overhead_mib(memory_mib: u64, accel: Accel) -> u64 {
    let translation = match accel {
        Accel::Tcg => TCG_CACHE_MIB,
        Accel::Kvm => 0,
    };
    (memory_mib / 4).max(256) + translation
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_random_mac_is_always_local_and_unicast() {
        for first in [0x00, 0x01, 0xff, 0xfe, 0x53] {
            let mac = Mac::from_random([first, 1, 2, 3, 4, 5]);

            let octet = u8::from_str_radix(&mac.to_string()[..2], 16).unwrap();
            assert_eq!(octet & 0x03, 0x02, "{mac}");
            assert!(mac.to_string().ends_with(":01:02:03:04:05"), "{mac}");
        }
    }

    #[test]
    fn a_privileged_node_gives_each_vm_its_own_user_and_a_memory_limit() {
        let confined = Confinement::for_vm(7, 1024, Accel::Kvm, true);
        assert_eq!(
            confined.user,
            Some(Ids {
                uid: 200_007,
                gid: 200_007
            })
        );
        assert_eq!(confined.memory_limit_mib, Some(1024 + 256));
        assert_eq!(
            Confinement::for_vm(1, 4096, Accel::Kvm, true).memory_limit_mib,
            Some(5120)
        );
        // Under TCG, the translation cache too.
        assert_eq!(
            Confinement::for_vm(1, 1024, Accel::Tcg, true).memory_limit_mib,
            Some(1024 + 256 + TCG_CACHE_MIB)
        );
        assert_eq!(
            Confinement::for_vm(7, 1024, Accel::Kvm, false),
            Confinement::default()
        );
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(Cpus::new(0).is_err());
        assert!(Cpus::new(MAX_CPUS + 1).is_err());
        assert_eq!(Cpus::new(2).unwrap().get(), 2);
    }

    #[test]
    fn rejects_memory_beyond_the_host() {
        assert!(matches!(
            MemoryMib::new(0, 1024),
            Err(SpecError::MemoryTooSmall(0))
        ));
        assert!(matches!(
            MemoryMib::new(2048, 1024),
            Err(SpecError::MemoryTooLarge { .. })
        ));
        assert_eq!(MemoryMib::new(1024, 1024).unwrap().get(), 1024);
    }

    #[test]
    fn rejects_names_with_path_characters() {
        assert!(VmName::new("web-1").is_ok());
        assert!(VmName::new("").is_err());
        assert!(VmName::new("../etc").is_err());
        assert!(VmName::new("a/b").is_err());
        assert!(VmName::new(&"x".repeat(64)).is_err());
    }

    #[test]
    fn rejects_a_text_file_as_kernel() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"not a kernel at all").unwrap();

        let result = DirectBoot::new(file.path(), None, "");

        assert!(matches!(result, Err(SpecError::NotAKernel { .. })));
    }

    #[test]
    fn accepts_a_bzimage_header() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&image).unwrap();

        assert!(DirectBoot::new(file.path(), None, "console=ttyS0").is_ok());
    }

    #[test]
    fn reports_a_missing_kernel_as_unreadable() {
        let result = DirectBoot::new(Path::new("/nonexistent/vmlinuz"), None, "");

        assert!(matches!(
            result,
            Err(SpecError::Unreadable { what: "kernel", .. })
        ));
    }

    #[test]
    fn a_generation_id_is_a_version_4_uuid() {
        let id = generation_id([0xff; 16]);

        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_ne!(new_generation_id().unwrap(), new_generation_id().unwrap());
    }

    #[test]
    fn formats_and_parses_mac_addresses() {
        let mac = Mac::local(0x00ab_cdef);

        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("52:54:00:ab:cd:ef".parse::<Mac>().unwrap(), mac);
        assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
    }
}
