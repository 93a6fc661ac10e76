//! Starting the QEMU process so that it is owned, logged and detached.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid, setsid};

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::libc;

use super::QemuError;
use super::sandbox::{FIRST_TAP_FD, Handover};

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

/// Starts `binary`. The child writes its own pid to `pidfile` before it
/// execs: whatever happens to us from then on, the process is on record
/// (a daemon killed at any moment finds it again through the file).
pub fn spawn(
    binary: &Path,
    args: &[OsString],
    log: &Path,
    pidfile: &Path,
    lifetime: Lifetime,
    handover: Handover,
) -> Result<tokio::process::Child, QemuError> {
    let spawn_failed = |source| QemuError::Spawn {
        binary: binary.to_owned(),
        source,
    };
    let pidfile = std::ffi::CString::new(pidfile.as_os_str().as_encoded_bytes())
        .map_err(|_| spawn_failed(std::io::Error::other("a NUL byte in the pidfile path")))?;
    let log = File::create(log).map_err(spawn_failed)?;
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_failed)?)
        .stderr(log);
    let parent = Pid::this();
    // Raw numbers for the child; the fds stay open (owned by `handover`)
    // until the child has exec'd.
    // At most one per cgroup v1 hierarchy (memory, cpu, cpuset).
    let mut cgroup_procs = [-1 as RawFd; 3];
    for (slot, fd) in cgroup_procs.iter_mut().zip(&handover.cgroup_procs) {
        *slot = fd.as_raw_fd();
    }
    let mut fds = [0 as RawFd; MAX_FDS];
    if handover.fds.len() > MAX_FDS {
        return Err(spawn_failed(std::io::Error::other(format!(
            "{} fds to hand over; at most {MAX_FDS}",
            handover.fds.len()
        ))));
    }
    for (slot, fd) in fds.iter_mut().zip(&handover.fds) {
        *slot = fd.as_raw_fd();
    }
    let fd_count = handover.fds.len();
    let user = handover.user;
    let extra_group = handover.extra_group;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (setsid, getpid, open, write,
    // close, dup2, setgroups, setresgid, setresuid, prctl, getppid); it
    // allocates nothing and touches no lock (the pidfile's path and the
    // fds were made before the fork).
    unsafe {
        command.pre_exec(move || {
            // Its own session: a Ctrl-C on our terminal does not reach QEMU.
            setsid()?;
            write_own_pid(&pidfile)?;
            // Into its cgroup before it allocates anything.
            for procs in cgroup_procs.into_iter().filter(|fd| *fd >= 0) {
                // SAFETY: the fd stays open in the parent's `handover`
                // until after exec; this borrow ends here.
                let procs = BorrowedFd::borrow_raw(procs);
                nix::unistd::write(procs, b"0\n")?;
            }
            // The TAP devices (and a state to restore) at the fds its
            // command line names (dup2 clears close-on-exec on the copy).
            for (index, fd) in fds[..fd_count].iter().enumerate() {
                let target = FIRST_TAP_FD + i32::try_from(index).unwrap_or(0);
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Last, the VM's own user: nothing privileged is left to do.
            if let Some(ids) = user {
                match extra_group {
                    Some(gid) => nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(gid)])?,
                    None => nix::unistd::setgroups(&[])?,
                }
                let gid = nix::unistd::Gid::from_raw(ids.gid);
                let uid = nix::unistd::Uid::from_raw(ids.uid);
                nix::unistd::setresgid(gid, gid, gid)?;
                nix::unistd::setresuid(uid, uid, uid)?;
            }
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
    let child = command.spawn().map_err(spawn_failed);
    // The child has its copies now.
    drop(handover);
    child
}

/// How many fds one QEMU can be handed (TAP devices, a state).
const MAX_FDS: usize = 16;

/// Writes this process's pid (decimal and a newline) to `path`, making
/// no allocation: it runs between fork and exec.
fn write_own_pid(path: &std::ffi::CStr) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let mut digits = [0u8; 12];
    let mut at = digits.len() - 1;
    digits[at] = b'\n';
    let mut pid = u32::try_from(nix::unistd::getpid().as_raw()).unwrap_or(0);
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(pid % 10).unwrap_or(0);
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let fd = open(
        path,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let written = nix::unistd::write(&fd, &digits[at..]);
    drop(fd);
    written.map(drop).map_err(std::io::Error::from)
}

/// The pid a spawned process wrote to `pidfile`, if that process still
/// runs with `socket` in its command line.
pub fn pid_from_file(pidfile: &Path, socket: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    runs_with(pid, socket).then_some(pid)
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

/// CPU time and memory of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// User plus system time, in clock ticks converted to milliseconds.
    pub cpu_millis: u64,
    pub resident_bytes: u64,
}

impl Usage {
    /// This process's own use.
    pub fn of_this_process() -> Option<Usage> {
        usage(std::process::id())
    }

    /// Another process's use.
    pub fn of_pid(pid: u32) -> Option<Usage> {
        usage(pid)
    }
}

/// Reads `/proc/PID/stat`: utime and stime (fields 14, 15) and rss (24).
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat, page_size(), ticks_per_second())
}

fn parse_stat(stat: &str, page_size: u64, ticks: u64) -> Option<Usage> {
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. Field 3 (state) is index 0 here.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss: u64 = fields.get(21)?.parse().ok()?;
    Some(Usage {
        cpu_millis: (utime + stime) * 1000 / ticks.max(1),
        resident_bytes: rss * page_size,
    })
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(4096)
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100)
}

/// How a process's memory is shared, from `/proc/PID/smaps` (its
/// mappings summed as `smaps_rollup` sums them) and
/// `/proc/PID/ksm_merging_pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Proportional set size: each resident page divided by the number
    /// of processes that map it.
    pub pss_bytes: u64,
    /// Resident pages only this process maps.
    pub private_bytes: u64,
    /// Resident pages other processes map too (a template's, KSM's).
    pub shared_bytes: u64,
    /// Of the guest's RAM (its largest mapping) when that is a file
    /// mapped private — a warm template's RAM: the resident pages still
    /// the file's, shared with the template's other clones.
    pub template_shared_bytes: Option<u64>,
    /// Pages KSM merged with identical ones (of this or other processes).
    pub ksm_merged_bytes: u64,
}

impl MemoryUse {
    pub fn of_pid(pid: u32) -> Option<MemoryUse> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let merged: u64 = std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        let mut use_ = parse_smaps(&smaps);
        use_.ksm_merged_bytes = merged * page_size();
        Some(use_)
    }
}

/// Sums `smaps`'s fields over its mappings, and reads the largest
/// mapping's sharing when it is a private mapping of a file.
fn parse_smaps(smaps: &str) -> MemoryUse {
    /// One mapping: its header's permissions and path, and its fields.
    #[derive(Default)]
    struct Mapping {
        private_file: bool,
        size: u64,
        shared: u64,
    }
    let mut total = MemoryUse::default();
    let mut largest = Mapping::default();
    let mut current = Mapping::default();
    let finish = |mapping: Mapping, largest: &mut Mapping| {
        if mapping.size > largest.size {
            *largest = mapping;
        }
    };
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !first.ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode, path.
            finish(std::mem::take(&mut current), &mut largest);
            let perms = words.next().unwrap_or_default();
            let inode = words.nth(2).unwrap_or("0");
            let path = words.next().unwrap_or_default();
            current.private_file = perms.ends_with('p') && inode != "0" && path.starts_with('/');
            continue;
        }
        let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let bytes = kib * 1024;
        match first {
            "Size:" => current.size = bytes,
            "Pss:" => total.pss_bytes += bytes,
            "Private_Clean:" | "Private_Dirty:" => total.private_bytes += bytes,
            "Shared_Clean:" | "Shared_Dirty:" => {
                total.shared_bytes += bytes;
                current.shared += bytes;
            }
            _ => {}
        }
    }
    finish(current, &mut largest);
    total.template_shared_bytes = largest.private_file.then_some(largest.shared);
    total
}

/// Whether `pid` is alive and not a zombie.
pub fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Whether `pid` is a live process whose command line names `socket`: a
/// guard against a recycled pid before we signal or adopt it.
pub fn runs_with(pid: u32, socket: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = socket.as_os_str().as_encoded_bytes();
    is_alive(pid) && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// SIGKILL to a process we did not start (checked with [`runs_with`] first
/// by the caller).
pub fn kill(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_and_rss_from_proc_stat() {
        let stat = "1234 (qemu-system-x86) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 50 0 0 20 0 3 0 100 1000000 2560 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

        let usage = parse_stat(stat, 4096, 100).unwrap();

        assert_eq!(usage.cpu_millis, 3000);
        assert_eq!(usage.resident_bytes, 2560 * 4096);
    }

    #[test]
    fn sums_smaps_and_reads_a_template_mappings_share() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 512 kB
Pss:                 256 kB
Shared_Clean:        512 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
7f0000000000-7f0020000000 rw-p 00000000 fd:01 99 /var/lib/quetzal/templates/desk/ram
Size:             524288 kB
Rss:              300000 kB
Pss:              100000 kB
Shared_Clean:     250000 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:     50000 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Pss:                  12 kB
Private_Dirty:        12 kB
";
        let template = parse_smaps(smaps);
        let anonymous =
            parse_smaps(&smaps.replace("fd:01 99 /var/lib/quetzal/templates/desk/ram", "00:00 0"));

        assert_eq!(template.pss_bytes, (256 + 100_000 + 12) * 1024);
        assert_eq!(template.private_bytes, (50_000 + 12) * 1024);
        assert_eq!(template.shared_bytes, (512 + 250_000) * 1024);
        assert_eq!(template.template_shared_bytes, Some(250_000 * 1024));
        assert_eq!(anonymous.template_shared_bytes, None);
    }

    #[test]
    fn copes_with_parentheses_in_the_command_name() {
        let stat = "7 (a) b) R 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 1 1 1 0";

        assert_eq!(parse_stat(stat, 4096, 100).unwrap().cpu_millis, 20);
    }
}
