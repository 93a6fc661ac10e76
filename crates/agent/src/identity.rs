//! The clone hook: a guest that was copied (an instant clone resumes its
//! template's memory) becomes a machine of its own. Each step runs, in an
//! order where each finds what the one before set: the clock (the copy's
//! is its template's), a new machine-id, the host name, new SSH host keys,
//! the NIC's own MAC address where the host gives one, and a DHCP renew
//! (the new name, identity and address reach the DHCP server).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use quetzal_qga::port::{Reidentified, Reidentify, Step};

pub fn reidentify(request: &Reidentify) -> Reidentified {
    let mut steps = Vec::new();
    // First: everything after draws random numbers (a machine-id, keys).
    if let Some(seed) = &request.seed {
        steps.push(("entropy", reseed(seed)));
    }
    steps.extend([
        ("clock", set_clock(request.unix_ms)),
        ("machine-id", new_machine_id()),
        ("hostname", set_hostname(&request.hostname)),
        ("ssh-host-keys", new_ssh_host_keys()),
    ]);
    if let Some(mac) = &request.mac {
        steps.push(("mac", set_mac(mac)));
    }
    steps.push(("dhcp", renew_dhcp()));
    Reidentified {
        id: request.id,
        steps: steps
            .into_iter()
            .map(|(step, outcome)| Step {
                step: step.to_owned(),
                outcome: outcome.unwrap_or_else(|why| format!("failed: {why}")),
            })
            .collect(),
    }
}

type Outcome = Result<String, String>;

fn ok() -> Outcome {
    Ok("ok".to_owned())
}

pub fn set_clock(unix_ms: i64) -> Outcome {
    let spec = nix::sys::time::TimeSpec::new(
        unix_ms.div_euclid(1000),
        unix_ms.rem_euclid(1000) * 1_000_000,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec)
        .map_err(|err| err.to_string())?;
    ok()
}

nix::ioctl_none_bad!(rndreseedcrng, nix::request_code_none!(b'R', 0x07));

/// Mixes the host's random bytes into the kernel's pool and reseeds the
/// generator from it: a clone resumed from its template's memory would
/// otherwise draw the same numbers as every other clone (a kernel with a
/// VMGENID driver reseeds by itself; Debian's cloud kernel has none).
fn reseed(seed_hex: &str) -> Outcome {
    let seed: Vec<u8> = (0..seed_hex.len() / 2)
        .map(|i| u8::from_str_radix(seed_hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| "the seed is not hex".to_owned())?;
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|err| format!("/dev/urandom: {err}"))?;
    std::io::Write::write_all(&mut urandom, &seed).map_err(|err| format!("/dev/urandom: {err}"))?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is /dev/urandom,
    // open for the whole call.
    unsafe { rndreseedcrng(std::os::fd::AsRawFd::as_raw_fd(&urandom)) }
        .map_err(|err| format!("RNDRESEEDCRNG: {err}"))?;
    ok()
}

fn new_machine_id() -> Outcome {
    let etc = Path::new("/etc/machine-id");
    if !etc.exists() {
        return Ok("skipped: no /etc/machine-id".to_owned());
    }
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .map_err(|err| format!("/dev/urandom: {err}"))?;
    let id: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(etc, format!("{id}\n")).map_err(|err| format!("/etc/machine-id: {err}"))?;
    // D-Bus keeps its own copy where it is not a link to systemd's.
    let dbus = Path::new("/var/lib/dbus/machine-id");
    if dbus.symlink_metadata().is_ok_and(|meta| meta.is_file()) {
        std::fs::write(dbus, format!("{id}\n"))
            .map_err(|err| format!("{}: {err}", dbus.display()))?;
    }
    ok()
}

fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
}

fn set_hostname(name: &str) -> Outcome {
    if !valid_hostname(name) {
        return Err(format!("{name:?} is not a host name"));
    }
    nix::unistd::sethostname(name).map_err(|err| err.to_string())?;
    if Path::new("/etc/hostname").exists() {
        std::fs::write("/etc/hostname", format!("{name}\n"))
            .map_err(|err| format!("/etc/hostname: {err}"))?;
    }
    ok()
}

fn new_ssh_host_keys() -> Outcome {
    let dir = Path::new("/etc/ssh");
    if !dir.join("sshd_config").exists() {
        return Ok("skipped: no sshd".to_owned());
    }
    for entry in std::fs::read_dir(dir)
        .map_err(|err| err.to_string())?
        .flatten()
    {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub")) {
            std::fs::remove_file(entry.path()).map_err(|err| format!("{name}: {err}"))?;
        }
    }
    // sshd reads its keys for each connection it forks: new ones serve
    // the next login. Ed25519 and ECDSA only: an RSA key takes seconds to
    // make under emulation (what every client has offered for years).
    for kind in ["ed25519", "ecdsa"] {
        let key = dir.join(format!("ssh_host_{kind}_key"));
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(&key))?;
    }
    ok()
}

/// `struct ifreq` with a hardware address, as SIOCSIFHWADDR reads it.
#[repr(C)]
struct HwAddrReq {
    name: [u8; 16],
    family: u16,
    data: [u8; 14],
    _pad: [u8; 8],
}

const ARPHRD_ETHER: u16 = 1;

nix::ioctl_write_ptr_bad!(siocsifhwaddr, nix::libc::SIOCSIFHWADDR, HwAddrReq);

/// The guest's NICs (devices, not `lo` or virtual ones) and their MACs.
fn nics() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut nics: Vec<(String, String)> = dir
        .flatten()
        .filter(|link| link.path().join("device").exists())
        .filter_map(|link| {
            let address = std::fs::read_to_string(link.path().join("address")).ok()?;
            Some((
                link.file_name().to_string_lossy().into_owned(),
                address.trim().to_owned(),
            ))
        })
        .collect();
    nics.sort();
    nics
}

/// Gives the NIC the host's MAC address (a clone resumed with its
/// template's). virtio-net tells the device, so the host and a later
/// boot agree.
fn set_mac(mac: &str) -> Outcome {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{mac:?} is not a MAC address"))?;
    if bytes.len() != 6 {
        return Err(format!("{mac:?} is not a MAC address"));
    }
    let nics = nics();
    if nics
        .iter()
        .any(|(_, address)| address.eq_ignore_ascii_case(mac))
    {
        return ok();
    }
    let [(name, _)] = nics.as_slice() else {
        return Err(format!("{} NICs; the MAC is set on one only", nics.len()));
    };
    let mut request = HwAddrReq {
        name: [0; 16],
        family: ARPHRD_ETHER,
        data: [0; 14],
        _pad: [0; 8],
    };
    request.name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    request.data[..6].copy_from_slice(&bytes);
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|err| err.to_string())?;
    // SAFETY: SIOCSIFHWADDR reads a `struct ifreq` from the pointer, which
    // points at one laid out as the kernel expects and lives across the
    // call.
    unsafe { siocsifhwaddr(std::os::fd::AsRawFd::as_raw_fd(&socket), &request) }
        .map_err(|err| format!("{name}: {err}"))?;
    ok()
}

fn renew_dhcp() -> Outcome {
    let links: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.flatten()
                .map(|link| link.file_name().to_string_lossy().into_owned())
                .filter(|name| name != "lo")
                .collect()
        })
        .unwrap_or_default();
    if links.is_empty() {
        return Ok("skipped: no network interface".to_owned());
    }
    if Path::new("/usr/bin/networkctl").exists() {
        // networkd's DHCP client identity comes from the machine-id, read
        // when it starts: a restart asks with the new one (queued, not
        // waited for: the lease follows within a second or so).
        return run(Command::new("systemctl").args(["restart", "--no-block", "systemd-networkd"]));
    }
    // busybox's udhcpc renews its lease on SIGUSR1.
    let udhcpc = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "udhcpc")
        })
        .collect::<Vec<_>>();
    if udhcpc.is_empty() {
        return Ok("skipped: no DHCP client found".to_owned());
    }
    for pid in udhcpc {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .map_err(|err| format!("udhcpc {pid}: {err}"))?;
    }
    ok()
}

fn run(command: &mut Command) -> Outcome {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{:?}: {err}", command.get_program()))?;
    if output.status.success() {
        return ok();
    }
    let said = String::from_utf8_lossy(&output.stderr);
    Err(said.trim().chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_host_names_are_set() {
        assert!(valid_hostname("desk-17"));
        for bad in [
            "",
            "-lead",
            "a.b",
            "has space",
            &"x".repeat(64),
            "semi;colon",
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }
}
