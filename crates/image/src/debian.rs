//! The `debian` and `desktop` images: Debian 12 installed by `mmdebstrap`
//! from Debian's archive (systemd, openssh-server, cloud-init, a Debian
//! kernel, `quetzal-agent`), on a qcow2 disk with an MBR partition table
//! and GRUB for BIOS — they boot the way a downloaded cloud image does.
//! The kernel and initrd are also kept beside the disk, for a direct boot.
//! `desktop` is `debian` with Debian's generic kernel (DRM, VMGENID, the
//! i6300esb watchdog), Xorg and Xfce logged in on the screen.
//!
//! No mount is needed: the filesystem is written into the disk file by
//! `mkfs.ext4 -d` at the partition's offset, and GRUB's boot sector and
//! core image are written into the first megabyte by [`boot_area`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::{
    BootFrom, CloudInit, Firmware, ImageError, Manifest, PackageRecord, Plan, agent, apt, build_id,
    find_file, now_unix, record, sha256_bytes, sha256_file,
};

pub const SUITE: &str = "bookworm";

/// The archive, its updates and its security updates.
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// What sets one Debian image apart from the other.
#[derive(Debug)]
pub struct Flavor {
    pub name: &'static str,
    /// Bumped whenever what this file makes of the flavor changes, so
    /// cached images are rebuilt.
    pub recipe: u32,
    pub kernel_package: &'static str,
    /// Installed beside [`PACKAGES`].
    pub packages: &'static [&'static str],
    /// Packages whose versions name the build, beside the kernel's,
    /// systemd's and cloud-init's.
    pub versioned: &'static [&'static str],
    /// The size of the disk the guest sees; the root filesystem is all of
    /// it after the first megabyte.
    pub disk_mib: u64,
    /// The kernel command line (of GRUB's entry, and of a direct boot).
    pub append: &'static str,
    /// A graphical session logged in on the screen.
    pub desktop: bool,
}

/// A server: SSH, cloud-init and the agent, on Debian's cloud kernel (the
/// smallest, fastest to boot). The last `console=` is `/dev/console`, the
/// serial port. `no_timer_check` as in `tiny`'s: a loaded TCG host must
/// not fail the kernel's timer check.
pub const DEBIAN: Flavor = Flavor {
    name: "debian",
    recipe: 4,
    kernel_package: "linux-image-cloud-amd64",
    packages: &[],
    versioned: &[],
    disk_mib: 3072,
    append: "root=LABEL=debian-root ro console=tty0 console=ttyS0,115200 no_timer_check",
    desktop: false,
};

/// A desktop: Xorg (its modesetting driver on the kernel's virtio GPU
/// driver for QEMU's virtio-vga; libinput for the USB tablet's absolute
/// pointer; xclip for the clipboard the host shares) and Xfce's core (window manager, panel, desktop,
/// settings, terminal), logged in by LightDM as the default user, on
/// Debian's generic kernel. Compressed swap in RAM (zswap) is on.
pub const DESKTOP: Flavor = Flavor {
    name: "desktop",
    recipe: 3,
    kernel_package: "linux-image-amd64",
    packages: &[
        "xserver-xorg-core",
        "xserver-xorg-input-libinput",
        "x11-xserver-utils",
        "lightdm",
        "lightdm-gtk-greeter",
        "xfce4-session",
        "xfwm4",
        "xfce4-panel",
        "xfdesktop4",
        "xfce4-settings",
        "xfce4-terminal",
        "dbus-user-session",
        "fonts-dejavu-core",
        "xdotool",
        "xclip",
    ],
    versioned: &["xserver-xorg-core", "xfce4-session"],
    disk_mib: 4096,
    append: "root=LABEL=debian-root ro console=tty0 console=ttyS0,115200 no_timer_check \
             zswap.enabled=1",
    desktop: true,
};

/// Installed on top of `apt`'s minimal set (Essential and apt), with the
/// flavor's kernel and packages. `qemu-guest-agent` is there but masked:
/// `quetzal-agent` owns the channel; unmasking the stock one (and
/// removing ours) is how a test shows the node needs no Quetzal code in a
/// guest.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "initramfs-tools",
    "openssh-server",
    "cloud-init",
    "qemu-guest-agent",
    "sudo",
    "iproute2",
    "iputils-ping",
    "procps",
    "sqlite3",
    "e2fsprogs",
    "netbase",
    "less",
];

/// The user cloud-init makes (Debian's `cloud.cfg`), with passwordless
/// sudo; `--ssh-key` authorizes keys for it.
pub const DEFAULT_USER: &str = "debian";

/// The root filesystem's label, which both GRUB's and a direct boot's
/// command line name.
pub const LABEL: &str = "debian-root";

/// Where the root partition starts, in 512-byte sectors: 1 MiB, leaving
/// room for GRUB's core image after the boot sector.
const PARTITION_START: u64 = 2048;

/// GRUB's modules in the core image: enough to read an ext4 partition of
/// an MBR disk and boot Linux from it, with its menu on the serial port.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "ext2",
    "normal",
    "linux",
    "gzio",
    "serial",
    "terminal",
    "echo",
    "test",
    "boot",
];
const GRUB_DIR: &str = "/usr/lib/grub/i386-pc";

/// What the next build of `flavor` is made of, from apt's package lists.
pub(crate) fn plan(flavor: &'static Flavor) -> Result<Plan, ImageError> {
    apt::require_tools(&[
        "mmdebstrap",
        "apt-cache",
        "mkfs.ext4",
        "qemu-img",
        "grub-mkimage",
        "chroot",
    ])?;
    for file in ["boot.img", "diskboot.img", "biosdisk.mod"] {
        if !Path::new(GRUB_DIR).join(file).is_file() {
            return Err(ImageError::MissingTool {
                tool: format!("{GRUB_DIR}/{file}"),
                package: "grub-pc-bin".to_owned(),
            });
        }
    }
    let kernel_meta = apt::show(flavor.kernel_package)?;
    let kernel_name = kernel_meta
        .depends
        .iter()
        .find(|dep| dep.starts_with("linux-image-"))
        .ok_or_else(|| ImageError::PackageUnknown {
            package: flavor.kernel_package.to_owned(),
            message: "it depends on no linux-image package".to_owned(),
        })?;
    let kernel = apt::show(kernel_name)?;
    let mut versions = Vec::new();
    for package in ["systemd", "cloud-init"].iter().chain(flavor.versioned) {
        versions.push((*package, apt::show(package)?.version));
    }
    let (_, agent) = agent::load()?;
    let agent_sha = sha256_bytes(&agent);
    let mut parts = vec![
        SUITE,
        kernel.name.trim_start_matches("linux-image-"),
        &kernel.version,
    ];
    for (package, version) in &versions {
        parts.extend([*package, version.as_str()]);
    }
    let recipe = format!("r{}", flavor.recipe);
    parts.extend(["agent", agent_sha.get(..12).unwrap_or(&agent_sha), &recipe]);
    if flavor.desktop {
        parts.insert(0, flavor.name);
    }
    let id = build_id(&parts);
    let made_id = id.clone();
    Ok(Plan {
        id,
        make: Box::new(move |name, work, progress| {
            build(flavor, name, &made_id, (agent, agent_sha), work, progress)
        }),
    })
}

fn build(
    flavor: &Flavor,
    name: &str,
    id: &str,
    (agent, agent_sha): (Vec<u8>, String),
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ImageError> {
    let root = work.join("root");
    let out = work.join("out");
    std::fs::create_dir_all(&out).map_err(|err| ImageError::io(&out, err))?;

    let packages: Vec<&str> = PACKAGES
        .iter()
        .chain(flavor.packages)
        .chain([&flavor.kernel_package])
        .copied()
        .collect();
    progress(&format!(
        "installing Debian {SUITE} with mmdebstrap ({} packages and their dependencies)",
        packages.len()
    ));
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--quiet", "--variant=apt", "--mode=root"])
        .arg(format!("--include={}", packages.join(",")))
        // Keep the downloaded .debs, to record their sha256.
        .args(["--skip=essential/unlink", "--skip=cleanup/apt/cache"])
        .arg(SUITE)
        .arg(&root)
        .args(SOURCES);
    apt::run(&mut mmdebstrap)?;

    progress("configuring the guest (cloud-init, agent, network, GRUB)");
    let mut packages = installed_packages(&root)?;
    configure(flavor, &root, &agent)?;
    packages.push(PackageRecord {
        name: "quetzal-agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sha256: agent_sha,
    });
    for (file, prefix) in [("vmlinuz", "vmlinuz-"), ("initrd.img", "initrd.img-")] {
        let from = find_file(&root.join("boot"), prefix, flavor.kernel_package)?;
        let to = out.join(file);
        std::fs::copy(&from, &to).map_err(|err| ImageError::io(&to, err))?;
    }

    let disk_mib = flavor.disk_mib;
    progress(&format!("building the {disk_mib} MiB root disk"));
    let core = work.join("core.img");
    apt::run(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-p", "(hd0,msdos1)/boot/grub", "-o"])
            .arg(&core)
            .args(GRUB_MODULES),
    )?;
    let boot_img = read(&Path::new(GRUB_DIR).join("boot.img"))?;
    let core_img = read(&core)?;
    let sectors = disk_mib * 2048 - PARTITION_START;
    let area = boot_area(&boot_img, &core_img, PARTITION_START, sectors)?;
    let raw = work.join("root.raw");
    write_disk(&raw, &area, disk_mib << 20)?;
    apt::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", LABEL])
            .arg("-E")
            .arg(format!("offset={},root_owner=0:0", PARTITION_START * 512))
            .arg("-d")
            .arg(&root)
            .arg(&raw)
            .arg(format!("{}k", sectors / 2)),
    )?;
    let root_disk = out.join("root.qcow2");
    apt::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&root_disk),
    )?;

    Ok(Manifest {
        name: name.to_owned(),
        id: id.to_owned(),
        recipe: flavor.recipe,
        built_at_unix: now_unix(),
        packages,
        kernel: Some(record(&out, "vmlinuz")?),
        initrd: Some(record(&out, "initrd.img")?),
        root_disk: record(&out, "root.qcow2")?,
        root_disk_format: "qcow2".to_owned(),
        append: flavor.append.to_owned(),
        modules: Vec::new(),
        boot: BootFrom::Disk,
        firmware: Firmware::Bios,
        cloud_init: Some(CloudInit {
            default_user: Some(DEFAULT_USER.to_owned()),
        }),
        imported_from: None,
    })
}

/// cloud-init: only the NoCloud seed the node attaches (no network
/// probing for other clouds), no password logins, `/etc/hosts` naming the
/// VM, and no RSA host key (seconds of TCG time on every first boot).
const CLOUD_CFG: &str = "\
datasource_list: [ NoCloud, None ]
ssh_pwauth: false
disable_root: true
manage_etc_hosts: true
locale: C.UTF-8
ssh_genkeytypes: [ ed25519, ecdsa ]
system_info:
  network:
    renderers: [ networkd ]
";

/// DHCP on every Ethernet NIC cloud-init did not configure (an imported
/// copy booted without a seed still gets an address).
const FALLBACK_NETWORK: &str = "\
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
";

/// One NIC with an address is enough to call the network online; never
/// hold the boot for minutes over a NIC without DHCP.
const WAIT_ONLINE: &str = "\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
";

const AGENT_UNIT: &str = "\
[Unit]
Description=Quetzal guest agent (virtio-serial)
Documentation=https://github.com/quetzal/quetzal/blob/main/docs/architecture.md

[Service]
ExecStart=/usr/sbin/quetzal-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

/// LightDM logs the default user ([`DEFAULT_USER`], made by cloud-init
/// before any login, which LightDM waits for) into Xfce on the screen,
/// with no greeter.
const LIGHTDM: &str = "\
[Seat:*]
autologin-user=debian
autologin-user-timeout=0
autologin-session=xfce
";

/// The screen never blanks: a desktop shown in a browser has no monitor
/// to save.
const XORG_NO_BLANKING: &str = "\
Section \"ServerFlags\"
    Option \"BlankTime\" \"0\"
    Option \"StandbyTime\" \"0\"
    Option \"SuspendTime\" \"0\"
    Option \"OffTime\" \"0\"
EndSection
";

/// The screen takes the size the browser asks for: QEMU hands a VNC
/// client's SetDesktopSize to the virtio GPU as a display change, the
/// kernel sends a DRM change uevent, and this sets the output to its new
/// preferred mode. Started in the desktop session (XDG autostart).
const SCREEN_FOLLOWS: &str = r#"#!/bin/sh
# Sets the screen to the size the console asks for, at start and on
# every DRM change event.
follow() {
    output=$(xrandr --query | awk '$2 == "connected" { print $1; exit }')
    [ -n "$output" ] && xrandr --output "$output" --auto
}
follow
stdbuf -oL udevadm monitor --udev --subsystem-match=drm | while read -r line; do
    case $line in
    *change*) follow ;;
    esac
done
"#;

const SCREEN_FOLLOWS_AUTOSTART: &str = "\
[Desktop Entry]
Type=Application
Name=Screen size from the console
Exec=/usr/local/bin/quetzal-screen-follows
NoDisplay=true
";

/// The desktop session's clipboard for the host: quetzal-agent runs it
/// (as root) for `GET`/`PUT /api/v1/vms/{name}/clipboard`. `get` prints
/// the clipboard's text, `set` puts stdin there (xclip keeps serving it
/// until something else is copied).
const CLIPBOARD: &str = r#"#!/bin/sh
set -eu
session=$(loginctl show-seat seat0 --property=ActiveSession --value 2>/dev/null || true)
if [ -z "$session" ]; then
    echo "no desktop session on the screen" >&2
    exit 2
fi
user=$(loginctl show-session "$session" --property=Name --value)
display=$(loginctl show-session "$session" --property=Display --value)
home=$(getent passwd "$user" | cut -d: -f6)
as_user() {
    runuser -u "$user" -- env DISPLAY="$display" XAUTHORITY="$home/.Xauthority" "$@"
}
case ${1:-} in
get)
    # An empty clipboard is no error.
    as_user xclip -selection clipboard -out 2>/dev/null || true
    ;;
set)
    as_user xclip -selection clipboard -in >/dev/null 2>&1
    ;;
*)
    echo "usage: quetzal-clipboard get|set" >&2
    exit 2
    ;;
esac
"#;

/// systemd feeds the i6300esb watchdog every QEMU VM has (the generic
/// kernel drives it): a hung kernel stops feeding it, and QEMU resets the
/// guest. 20 s a stage, and the device has two: about 40 s from the hang.
const RUNTIME_WATCHDOG: &str = "\
[Manager]
RuntimeWatchdogSec=20s
";

/// A swap file, made by cloud-init on a VM's first boot (`fallocate`:
/// instant), for zswap to compress into: pages a desktop's memory
/// pressure pushes out go to compressed RAM first, not to the disk.
const CLOUD_CFG_SWAP: &str = "\
swap:
  filename: /swapfile
  size: 536870912
";

/// Where Xfce's panel reads its layout first: there, the panel starts
/// with Debian's default layout and asks nothing on a first login.
const PANEL_DEFAULT: &str = "etc/xdg/xfce4/panel/default.xml";
const PANEL_SKEL: &str = "etc/skel/.config/xfce4/xfconf/xfce-perchannel-xml/xfce4-panel.xml";

/// GRUB boots at once, its menu on the screen and the serial port. It
/// loads `/vmlinuz` and `/initrd.img`, the links Debian moves to each new
/// kernel, so a kernel upgraded inside the guest is the one that boots.
fn grub_cfg(append: &str) -> String {
    format!(
        "set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         linux /vmlinuz {append}\n\
         initrd /initrd.img\n\
         boot\n"
    )
}

/// Makes the installed tree a cloud image: no identity of its own (no
/// machine-id, host keys or host name: each VM's first boot makes them),
/// its root by label, the agent as a service, GRUB's configuration.
fn configure(flavor: &Flavor, root: &Path, agent: &[u8]) -> Result<(), ImageError> {
    let ssh = root.join("etc/ssh");
    for entry in std::fs::read_dir(&ssh).map_err(|err| ImageError::io(&ssh, err))? {
        let path = entry.map_err(|err| ImageError::io(&ssh, err))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ssh_host_"))
        {
            std::fs::remove_file(&path).map_err(|err| ImageError::io(&path, err))?;
        }
    }
    for gone in ["etc/hostname", "var/lib/dbus/machine-id"] {
        let path = root.join(gone);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(ImageError::io(&path, err)),
        }
    }
    let fstab = format!("LABEL={LABEL} / ext4 defaults,discard,errors=remount-ro 0 1\n");
    let grub_cfg = grub_cfg(flavor.append);
    let files: &[(&str, &[u8], u32)] = &[
        ("etc/machine-id", b"", 0o444),
        ("etc/fstab", fstab.as_bytes(), 0o644),
        (
            "etc/cloud/cloud.cfg.d/90-quetzal.cfg",
            CLOUD_CFG.as_bytes(),
            0o644,
        ),
        (
            "etc/systemd/network/99-quetzal-dhcp.network",
            FALLBACK_NETWORK.as_bytes(),
            0o644,
        ),
        (
            "etc/systemd/system/systemd-networkd-wait-online.service.d/quetzal.conf",
            WAIT_ONLINE.as_bytes(),
            0o644,
        ),
        (
            "etc/systemd/system/quetzal-agent.service",
            AGENT_UNIT.as_bytes(),
            0o644,
        ),
        ("usr/sbin/quetzal-agent", agent, 0o755),
        // What cloud-init's `ssh_pwauth: false` writes: there already, it
        // does not restart sshd in the middle of the first boot (it did,
        // and a client connecting then was refused).
        (
            "etc/ssh/sshd_config.d/50-cloud-init.conf",
            b"PasswordAuthentication no\n",
            0o600,
        ),
        ("boot/grub/grub.cfg", grub_cfg.as_bytes(), 0o644),
    ];
    for (path, contents, mode) in files {
        write_file(&root.join(path), contents, *mode)?;
    }
    if flavor.desktop {
        configure_desktop(root)?;
    }
    chroot_systemctl(
        root,
        "enable",
        &["quetzal-agent.service", "systemd-networkd.service"],
    )?;
    chroot_systemctl(
        root,
        "mask",
        &[
            "qemu-guest-agent.service",
            // Nothing downloads or scrubs behind a user's back at boot.
            "apt-daily.timer",
            "apt-daily-upgrade.timer",
            "e2scrub_all.timer",
            "e2scrub_reap.service",
        ],
    )
}

/// The graphical session on the screen (following the console's size,
/// its clipboard shared with the host), swap for zswap, and the
/// watchdog's feeding.
fn configure_desktop(root: &Path) -> Result<(), ImageError> {
    let panel = read(&root.join(PANEL_DEFAULT))?;
    let files: &[(&str, &[u8], u32)] = &[
        (
            "etc/lightdm/lightdm.conf.d/50-quetzal.conf",
            LIGHTDM.as_bytes(),
            0o644,
        ),
        (
            "etc/X11/xorg.conf.d/10-quetzal-no-blanking.conf",
            XORG_NO_BLANKING.as_bytes(),
            0o644,
        ),
        (
            "etc/systemd/system.conf.d/50-quetzal-watchdog.conf",
            RUNTIME_WATCHDOG.as_bytes(),
            0o644,
        ),
        (PANEL_SKEL, &panel, 0o644),
        (
            "usr/local/bin/quetzal-screen-follows",
            SCREEN_FOLLOWS.as_bytes(),
            0o755,
        ),
        (
            "etc/xdg/autostart/quetzal-screen-follows.desktop",
            SCREEN_FOLLOWS_AUTOSTART.as_bytes(),
            0o644,
        ),
        (
            "usr/local/bin/quetzal-clipboard",
            CLIPBOARD.as_bytes(),
            0o755,
        ),
        (
            "etc/cloud/cloud.cfg.d/91-quetzal-swap.cfg",
            CLOUD_CFG_SWAP.as_bytes(),
            0o644,
        ),
    ];
    for (path, contents, mode) in files {
        write_file(&root.join(path), contents, *mode)?;
    }
    chroot_systemctl(root, "enable", &["lightdm.service"])?;
    chroot_systemctl(root, "set-default", &["graphical.target"])
}

fn chroot_systemctl(root: &Path, verb: &str, units: &[&str]) -> Result<(), ImageError> {
    apt::run(
        Command::new("chroot")
            .arg(root)
            .args(["systemctl", "--quiet", verb])
            .args(units),
    )
    .map(drop)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| ImageError::io(dir, err))?;
    }
    std::fs::write(path, contents).map_err(|err| ImageError::io(path, err))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|err| ImageError::io(path, err))
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|err| ImageError::io(path, err))
}

/// The packages dpkg installed in `root`, each with the sha256 of the
/// `.deb` mmdebstrap downloaded (then deleted: the image does not carry
/// its own download cache).
fn installed_packages(root: &Path) -> Result<Vec<PackageRecord>, ImageError> {
    let status_path = root.join("var/lib/dpkg/status");
    let status =
        std::fs::read_to_string(&status_path).map_err(|err| ImageError::io(&status_path, err))?;
    let cache = root.join("var/cache/apt/archives");
    let mut debs = BTreeMap::new();
    for entry in std::fs::read_dir(&cache).map_err(|err| ImageError::io(&cache, err))? {
        let path = entry.map_err(|err| ImageError::io(&cache, err))?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(package) = file.strip_suffix(".deb").and_then(|f| f.split('_').next()) {
            let package = package.to_owned();
            debs.insert(package, sha256_file(&path)?.0);
            std::fs::remove_file(&path).map_err(|err| ImageError::io(&path, err))?;
        }
    }
    Ok(parse_status(&status)
        .into_iter()
        .map(|(name, version)| PackageRecord {
            sha256: debs.get(&name).cloned().unwrap_or_default(),
            name,
            version,
        })
        .collect())
}

/// `(package, version)` of every installed package in a dpkg status file.
fn parse_status(status: &str) -> Vec<(String, String)> {
    let mut installed = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(": "))
                .map(str::trim)
        };
        if let (Some(name), Some(version), Some("install ok installed")) =
            (field("Package"), field("Version"), field("Status"))
        {
            installed.push((name.to_owned(), version.to_owned()));
        }
    }
    installed.sort();
    installed
}

/// Makes `path` a sparse file of `bytes` whose start is `area`.
fn write_disk(path: &Path, area: &[u8], bytes: u64) -> Result<(), ImageError> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|err| ImageError::io(path, err))?;
    file.write_all(area)
        .and_then(|()| file.set_len(bytes))
        .map_err(|err| ImageError::io(path, err))
}

/// The first `partition_start` sectors of a BIOS-bootable disk: GRUB's
/// boot sector with an MBR partition table holding one bootable Linux
/// partition of `sectors` from `partition_start`, then GRUB's core image
/// from sector 1, its first sector told where the rest is — what
/// `grub-install` writes, without needing a block device.
fn boot_area(
    boot_img: &[u8],
    core_img: &[u8],
    partition_start: u64,
    sectors: u64,
) -> Result<Vec<u8>, ImageError> {
    let bad = |what: &str| ImageError::Tool {
        tool: "grub-mkimage".to_owned(),
        message: what.to_owned(),
    };
    if boot_img.len() != 512 {
        return Err(bad("boot.img is not one sector"));
    }
    let core_sectors = core_img.len().div_ceil(512);
    let area_len = usize::try_from(partition_start * 512).map_err(|_| bad("partition too far"))?;
    if core_sectors < 2 || 512 * (1 + core_sectors) > area_len {
        return Err(bad("the core image does not fit before the partition"));
    }
    let (Ok(start), Ok(count)) = (u32::try_from(partition_start), u32::try_from(sectors)) else {
        return Err(bad("the disk is too large for an MBR partition table"));
    };
    let mut area = vec![0u8; area_len];
    // Boot code only: bytes 440.. are the disk signature and the table.
    area[..440].copy_from_slice(&boot_img[..440]);
    let entry = &mut area[446..462];
    entry[0] = 0x80; // bootable
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use LBA
    entry[4] = 0x83; // Linux
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&count.to_le_bytes());
    area[510] = 0x55;
    area[511] = 0xaa;
    area[512..512 + core_img.len()].copy_from_slice(core_img);
    // diskboot.img (the core's first sector) ends in a block list: the
    // rest of the core is at sector 2 (its default) for this many sectors.
    let rest = u16::try_from(core_sectors - 1).map_err(|_| bad("core image too large"))?;
    area[512 + 0x1fc..512 + 0x1fe].copy_from_slice(&rest.to_le_bytes());
    Ok(area)
}

/// A raw copy of the debian image's disk, at `out`, with no Quetzal code
/// in its guest: `quetzal-agent` and its unit removed, Debian's stock
/// `qemu-guest-agent` unmasked. The stand-in, in tests and benchmarks, for
/// a cloud image downloaded from Debian. Mounts its root filesystem (a
/// loop device at the partition's offset, under `scratch`), so it needs
/// root; the mount and the device are gone on every path.
pub fn stock_agent_copy(
    image: &crate::Image,
    out: &Path,
    scratch: &Path,
) -> Result<(), ImageError> {
    apt::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "raw"])
            .arg(image.root_disk())
            .arg(out),
    )?;
    let offset = (PARTITION_START * 512).to_string();
    let device = apt::run(
        Command::new("losetup")
            .args(["--find", "--show", "--offset", &offset])
            .arg(out),
    )?
    .trim()
    .to_owned();
    std::fs::create_dir_all(scratch).map_err(|err| ImageError::io(scratch, err))?;
    let edited = apt::run(Command::new("mount").arg(&device).arg(scratch)).and_then(|_| {
        let result = [
            "usr/sbin/quetzal-agent",
            "etc/systemd/system/quetzal-agent.service",
            "etc/systemd/system/multi-user.target.wants/quetzal-agent.service",
            // The mask: a link to /dev/null.
            "etc/systemd/system/qemu-guest-agent.service",
        ]
        .iter()
        .try_for_each(|gone| {
            let path = scratch.join(gone);
            std::fs::remove_file(&path).map_err(|err| ImageError::io(&path, err))
        });
        let unmounted = apt::run(Command::new("umount").arg(scratch));
        result.and(unmounted.map(drop))
    });
    let detached = apt::run(Command::new("losetup").args(["-d", &device]));
    edited.and(detached.map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_img() -> Vec<u8> {
        let mut img = vec![0xeb; 512];
        img[510] = 0x55;
        img[511] = 0xaa;
        img
    }

    fn core_img(bytes: usize) -> Vec<u8> {
        let mut core = vec![0x11; bytes];
        // diskboot.img's default block list: start sector 2, no length.
        core[0x1f4..0x1fc].copy_from_slice(&2u64.to_le_bytes());
        core[0x1fc..0x200].copy_from_slice(&[0, 0, 0x20, 0x08]);
        core
    }

    #[test]
    fn writes_one_bootable_linux_partition_after_the_core_image() {
        let area = boot_area(&boot_img(), &core_img(150_000), 2048, 6_289_408).unwrap();

        assert_eq!(area.len(), 2048 * 512);
        assert_eq!(&area[510..512], &[0x55, 0xaa]);
        let entry = &area[446..462];
        assert_eq!(entry[0], 0x80);
        assert_eq!(entry[4], 0x83);
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 2048);
        assert_eq!(
            u32::from_le_bytes(entry[12..16].try_into().unwrap()),
            6_289_408
        );
        // The other three entries stay empty.
        assert!(area[462..510].iter().all(|b| *b == 0));
    }

    #[test]
    fn tells_the_core_image_how_many_sectors_follow_its_first() {
        let area = boot_area(&boot_img(), &core_img(150_000), 2048, 1000).unwrap();

        let first = &area[512..1024];
        assert_eq!(
            u64::from_le_bytes(first[0x1f4..0x1fc].try_into().unwrap()),
            2
        );
        // 150 000 bytes are 293 sectors: 292 after the first.
        assert_eq!(
            u16::from_le_bytes(first[0x1fc..0x1fe].try_into().unwrap()),
            292
        );
        assert_eq!(&first[0x1fe..0x200], &[0x20, 0x08]);
        assert_eq!(area[512 + 149_999], 0x11);
    }

    #[test]
    fn keeps_the_boot_code_but_not_the_boot_images_table_area() {
        let area = boot_area(&boot_img(), &core_img(2000), 2048, 1000).unwrap();

        assert!(area[..440].iter().all(|b| *b == 0xeb));
        assert!(area[440..446].iter().all(|b| *b == 0));
    }

    #[test]
    fn refuses_a_core_image_that_would_overlap_the_partition() {
        let result = boot_area(&boot_img(), &core_img(2048 * 512), 2048, 1000);

        assert!(matches!(result, Err(ImageError::Tool { .. })));
    }

    #[test]
    fn lists_only_installed_packages_from_dpkg_status() {
        let status = "Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b7\n";

        let packages = parse_status(status);

        assert_eq!(
            packages,
            vec![
                ("bash".to_owned(), "5.2.15-2+b7".to_owned()),
                ("zlib1g".to_owned(), "1:1.2.13".to_owned()),
            ]
        );
    }
}
