//! The `tiny` image: Debian's cloud kernel, and a busybox userland used both
//! as the initramfs and as the root disk.
//!
//! Boot: the initramfs `/init` loads the virtio drivers, mounts the first
//! virtio disk (if any) and `switch_root`s into it; either way busybox init
//! runs `/etc/init.d/rcS` (mounts, DHCP on eth0 if there is one, the power
//! button), then keeps `quetzal-agent` (the guest agent, on its
//! virtio-serial port) and a root shell on the serial console running.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use crate::tree::Tree;
use crate::{
    BootFrom, Firmware, ImageError, Manifest, PackageRecord, Plan, agent, apt, build_id, find_file,
    kmod, mib, now_unix, record, sha256_bytes, sha256_file,
};

/// Bumped whenever what this file produces changes, so cached images are
/// rebuilt.
pub const RECIPE: u32 = 8;

pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The drivers `/init` loads; their dependencies come along.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    // The ACPI power button, as an input device acpid can read.
    "button",
    "evdev",
    // Reports a guest kernel panic to QEMU.
    "pvpanic_mmio",
    // The balloon: memory statistics, and free pages given back to the
    // host (free-page reporting, for anonymous RAM).
    "virtio_balloon",
];

/// The kernel command line: kernel messages on the screen and the first
/// serial port, which is the console (the shell); a second shell runs on
/// the screen (tty1), for the graphical console. `no_timer_check`: under
/// TCG on a loaded host the kernel's early check that the timer ticks
/// can miss and panic ("IO-APIC + timer doesn't work"); a virtual
/// machine's timer is QEMU's, not broken hardware.
pub const APPEND: &str = "console=tty0 console=ttyS0 quiet no_timer_check";

/// The size of the root disk the guest sees.
pub const ROOT_DISK_MIB: u32 = 256;

const INIT: &str = r#"#!/bin/sh
# Quetzal tiny initramfs: load the virtio drivers, then boot from the first
# virtio disk if there is one, else run from this initramfs.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "tiny: cannot load $module"
done < /etc/quetzal/modules
has_disk=
for id in /sys/bus/virtio/devices/*/device; do
    [ "$(cat "$id" 2>/dev/null)" = 0x0002 ] && has_disk=1
done
if [ -n "$has_disk" ]; then
    tries=0
    while [ ! -b /dev/vda ] && [ "$tries" -lt 500 ]; do
        usleep 10000
        tries=$((tries + 1))
    done
    if mount -t ext4 /dev/vda /newroot 2>/dev/null; then
        umount /proc /sys
        mount --move /dev /newroot/dev
        exec switch_root /newroot /sbin/init
    fi
    echo "tiny: /dev/vda has no ext4 root; running from the initramfs"
fi
umount /proc /sys
exec /sbin/init
"#;

const RCS: &str = r#"#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
# The host gives each VM its own identity on the kernel command line.
machine_id=$(sed -n 's/.*quetzal\.machine_id=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
[ -n "$machine_id" ] && echo "$machine_id" > /etc/machine-id
ip link set lo up
acpid
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/udhcpc.script -x "hostname:$(hostname)" >/dev/null 2>&1 &
fi
root=$(awk '$2 == "/" { dev = $1 } END { print dev }' /proc/mounts)
echo "tiny: up, root on $root"
"#;

const INITTAB: &str = "::sysinit:/etc/init.d/rcS
::respawn:/bin/sh -c 'exec /usr/sbin/quetzal-agent >>/var/log/quetzal-agent.log 2>&1'
::respawn:/bin/cttyhack /bin/sh -l
tty1::respawn:/bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
";

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Called by udhcpc with the lease in the environment.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
        if [ -n "$router" ]; then
            ip route replace default via "${router%% *}" dev "$interface"
        fi
        : > /etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >> /etc/resolv.conf
        done
        ;;
esac
"#;

const POWER_BUTTON: &str = "#!/bin/sh\nexec poweroff\n";

const PROFILE: &str = "export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\\h:\\w\\$ '
";

/// The userland shared by the initramfs and the root disk: busybox, its
/// applet links, init's configuration.
///
/// `applets` are busybox's own paths (`bin/sh`, `sbin/init`), from
/// `busybox --list-full`.
pub fn userland(busybox: Vec<u8>, applets: &[String], agent: Vec<u8>) -> Tree {
    let mut tree = Tree::default();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/init.d",
        "etc/acpi",
        "etc/acpi/PWRF",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "mnt",
        "newroot",
        // acpid logs to /var/log/acpid.log and does not start without it.
        "var",
        "var/log",
        "var/run",
    ] {
        tree.dir(dir);
    }
    tree.file("bin/busybox", 0o755, busybox);
    for applet in applets {
        if applet == "bin/busybox" || applet.is_empty() {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        tree.symlink(applet, &target);
    }
    // The guest agent, kept running by init.
    tree.file("usr/sbin/quetzal-agent", 0o755, agent);
    tree.file("etc/init.d/rcS", 0o755, RCS);
    tree.file("etc/inittab", 0o644, INITTAB);
    tree.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT);
    // busybox acpid runs /etc/acpi/PWRF/00000080 for the power button.
    tree.file("etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON);
    tree.file("etc/profile", 0o644, PROFILE);
    tree.file("etc/hostname", 0o644, "tiny\n");
    tree.file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
    tree.file("etc/group", 0o644, "root:x:0:\n");
    tree.file("etc/resolv.conf", 0o644, "");
    tree
}

/// The initramfs: the userland, `/init`, `/dev/console` and the modules
/// (`(name, bytes)` in load order).
pub fn initramfs(mut userland: Tree, modules: Vec<(String, Vec<u8>)>) -> Tree {
    userland.char_device("dev/console", 5, 1);
    userland.file("init", 0o755, INIT);
    userland.dir("lib");
    userland.dir("lib/modules");
    userland.dir("etc/quetzal");
    let mut order = String::new();
    for (name, bytes) in modules {
        userland.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
        order.push_str(&name);
        order.push('\n');
    }
    userland.file("etc/quetzal/modules", 0o644, order);
    userland
}

/// What the next build of `tiny` is made of, from apt's package lists.
pub(crate) fn plan() -> Result<Plan, ImageError> {
    apt::require_tools(&["apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "qemu-img"])?;
    let kernel_meta = apt::show(KERNEL_PACKAGE)?;
    let kernel_name = kernel_meta
        .depends
        .iter()
        .find(|dep| dep.starts_with("linux-image-"))
        .ok_or_else(|| ImageError::PackageUnknown {
            package: KERNEL_PACKAGE.to_owned(),
            message: "it depends on no linux-image package".to_owned(),
        })?;
    let kernel = apt::show(kernel_name)?;
    let busybox = apt::show(BUSYBOX_PACKAGE)?;
    let (_, agent) = agent::load()?;
    let agent_sha = sha256_bytes(&agent);
    let id = tiny_id(&kernel, &busybox, &agent_sha);
    let made_id = id.clone();
    Ok(Plan {
        id,
        make: Box::new(move |name, work, progress| {
            build(
                name,
                &made_id,
                &kernel,
                &busybox,
                (agent, agent_sha),
                work,
                progress,
            )
        }),
    })
}

fn tiny_id(kernel: &apt::Package, busybox: &apt::Package, agent_sha: &str) -> String {
    build_id(&[
        kernel.name.trim_start_matches("linux-image-"),
        &kernel.version,
        "busybox",
        &busybox.version,
        "agent",
        agent_sha.get(..12).unwrap_or(agent_sha),
        &format!("r{RECIPE}"),
    ])
}

fn build(
    name: &str,
    id: &str,
    kernel: &apt::Package,
    busybox: &apt::Package,
    (agent, agent_sha): (Vec<u8>, String),
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ImageError> {
    let debs = work.join("debs");
    let out = work.join("out");
    for dir in [&debs, &out] {
        std::fs::create_dir_all(dir).map_err(|err| ImageError::io(dir, err))?;
    }

    let mut packages = Vec::new();
    let mut trees = Vec::new();
    for package in [kernel, busybox] {
        progress(&format!(
            "downloading {} {} ({:.1} MiB)",
            package.name,
            package.version,
            mib(package.size)
        ));
        let deb = apt::download(package, &debs)?;
        let tree = work.join(&package.name);
        apt::extract(&deb, &tree)?;
        packages.push(PackageRecord {
            name: package.name.clone(),
            version: package.version.clone(),
            sha256: sha256_file(&deb)?.0,
        });
        trees.push(tree);
    }
    let (kernel_tree, busybox_tree) = (&trees[0], &trees[1]);

    progress("building the initramfs");
    let vmlinuz = find_file(&kernel_tree.join("boot"), "vmlinuz-", &kernel.name)?;
    let modules_root = find_file(&kernel_tree.join("lib/modules"), "", &kernel.name)?;
    let index = kmod::ModuleIndex::scan(&modules_root)?;
    let order = index.load_order(MODULES)?;
    let mut modules = Vec::new();
    for (module, path) in &order {
        let bytes = std::fs::read(path).map_err(|err| ImageError::io(path, err))?;
        modules.push((module.clone(), bytes));
    }
    let busybox_bin = busybox_tree.join("bin/busybox");
    let applets: Vec<String> = apt::run(Command::new(&busybox_bin).arg("--list-full"))?
        .lines()
        .map(str::to_owned)
        .collect();
    let busybox_bytes =
        std::fs::read(&busybox_bin).map_err(|err| ImageError::io(&busybox_bin, err))?;
    let userland = userland(busybox_bytes, &applets, agent);
    packages.push(PackageRecord {
        name: "quetzal-agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sha256: agent_sha,
    });

    let initrd_path = out.join("initrd.img");
    let initrd_file =
        File::create(&initrd_path).map_err(|err| ImageError::io(&initrd_path, err))?;
    let mut writer = BufWriter::new(initrd_file);
    initramfs(userland.clone(), modules)
        .write_cpio(&mut writer)
        .and_then(|()| writer.into_inner().map_err(|err| err.into_error()))
        .and_then(|file| file.sync_all())
        .map_err(|err| ImageError::io(&initrd_path, err))?;

    progress(&format!("building the {} MiB root disk", ROOT_DISK_MIB));
    let staging = work.join("rootfs");
    std::fs::create_dir_all(&staging).map_err(|err| ImageError::io(&staging, err))?;
    userland.write_into(&staging)?;
    let raw = work.join("root.raw");
    apt::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "tiny-root", "-E", "root_owner=0:0", "-d"])
            .arg(&staging)
            .arg(&raw)
            .arg(format!("{}M", ROOT_DISK_MIB)),
    )?;
    let root_disk = out.join("root.qcow2");
    apt::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&root_disk),
    )?;

    let kernel_out = out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel_out).map_err(|err| ImageError::io(&kernel_out, err))?;

    Ok(Manifest {
        name: name.to_owned(),
        id: id.to_owned(),
        recipe: RECIPE,
        built_at_unix: now_unix(),
        packages,
        kernel: Some(record(&out, "vmlinuz")?),
        initrd: Some(record(&out, "initrd.img")?),
        root_disk: record(&out, "root.qcow2")?,
        root_disk_format: "qcow2".to_owned(),
        append: APPEND.to_owned(),
        modules: order.into_iter().map(|(name, _)| name).collect(),
        boot: BootFrom::Kernel,
        firmware: Firmware::Bios,
        cloud_init: None,
        imported_from: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Node;

    fn find<'a>(tree: &'a Tree, path: &str) -> Option<&'a Node> {
        tree.entries.iter().find(|(p, _)| p == path).map(|(_, n)| n)
    }

    #[test]
    fn links_applets_relative_to_busybox() {
        let tree = userland(
            b"elf".to_vec(),
            &["bin/sh".into(), "usr/bin/awk".into()],
            b"agent".to_vec(),
        );

        assert_eq!(
            find(&tree, "bin/sh"),
            Some(&Node::Symlink {
                target: "../bin/busybox".into()
            })
        );
        assert_eq!(
            find(&tree, "usr/bin/awk"),
            Some(&Node::Symlink {
                target: "../../bin/busybox".into()
            })
        );
    }

    #[test]
    fn initramfs_lists_modules_in_load_order() {
        let tree = initramfs(
            userland(b"elf".to_vec(), &[], b"agent".to_vec()),
            vec![("virtio".into(), vec![1]), ("virtio_pci".into(), vec![2])],
        );

        assert_eq!(
            find(&tree, "etc/quetzal/modules"),
            Some(&Node::File {
                mode: 0o644,
                data: b"virtio\nvirtio_pci\n".to_vec()
            })
        );
        assert!(find(&tree, "dev/console").is_some());
        assert!(find(&tree, "init").is_some());
    }

    #[test]
    fn names_builds_after_their_package_versions_and_recipe() {
        let package = |name: &str, version: &str| apt::Package {
            name: name.into(),
            version: version.into(),
            size: 0,
            depends: vec![],
        };

        let id = tiny_id(
            &package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
            &package("busybox-static", "1:1.35.0-4+b3"),
            "0123456789abcdef",
        );

        assert_eq!(
            id,
            format!(
                "6.1.0-56-cloud-amd64-6.1.192-2-busybox-1_1.35.0-4_b3-agent-0123456789ab-r{}",
                RECIPE
            )
        );
    }
}
