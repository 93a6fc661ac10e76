//! Imported images end to end: a disk with its own bootloader (made from
//! the debian image's disk, as a stand-in for a downloaded cloud image,
//! with Quetzal's agent taken out and Debian's stock `qemu-guest-agent`
//! let run) imported with `quetzal image import`, booted by its GRUB, and
//! driven through the stock agent: `vm exec`, `vm cp`, its addresses and
//! host name. Then `image rm`, refused while a VM uses the image. And a
//! UEFI-only disk (GPT, an EFI system partition, GRUB for UEFI) imported
//! as `uefi` and booted by OVMF.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::{Path, PathBuf};
use std::process::Command;

use quetzal_testkit::{Cli, DEBIAN_TIMEOUT, Daemon, debian, guest_memory_matches, wait_until_for};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A raw copy of the debian image's disk whose guest has no Quetzal code.
fn stock_agent_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("stock.raw");
    quetzal_image::debian::stock_agent_copy(&debian(), &disk, &dir.join("mnt")).unwrap();
    disk
}

fn show(cli: &Cli, name: &str) -> Value {
    serde_json::from_str(&cli.ok(&["vm", "show", name, "--output", "json"])).unwrap()
}

/// This node's own image directory, empty: the shared images are behind a
/// link, and imports go into the node's own.
fn own_images(daemon: &Daemon) -> PathBuf {
    let images = daemon.data.path().join("images");
    std::fs::remove_file(&images).unwrap();
    std::fs::create_dir(&images).unwrap();
    images
}

fn sha256(path: &Path) -> String {
    quetzal_image::sha256_file(path).unwrap().0
}

#[test]
fn an_imported_cloud_image_boots_by_itself_and_its_stock_agent_serves_exec_and_files() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let scratch = daemon.data.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let images = own_images(&daemon);
    let disk = stock_agent_disk(&scratch);

    let imported = cli.output(&[
        "image",
        "import",
        "stock",
        disk.to_str().unwrap(),
        "--user",
        "debian",
    ]);
    let said = String::from_utf8_lossy(&imported.stderr);
    assert!(imported.status.success(), "{said}");
    assert!(said.contains("bios firmware"), "{said}");
    let manifest = &serde_json::from_str::<Value>(&cli.ok(&["image", "list", "--output", "json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "stock")
        .unwrap()["manifest"]
        .clone();
    assert_eq!(manifest["boot"], "disk");
    assert!(
        manifest["imported_from"]
            .as_str()
            .unwrap()
            .contains(&sha256(&disk)),
        "{manifest}"
    );
    std::fs::remove_file(&disk).unwrap();

    cli.ok(&[
        "vm", "create", "stock-1", "--image", "stock", "--cpus", "2", "--memory", "1024", "--start",
    ]);
    wait_until_for("the stock agent", DEBIAN_TIMEOUT, || {
        show(&cli, "stock-1")["agent"]["connected"] == true
    });

    // Debian's qemu-guest-agent, not ours, and no Quetzal code in the guest.
    let vm = show(&cli, "stock-1");
    let version = vm["agent"]["version"].as_str().unwrap();
    assert!(!version.contains("quetzal"), "{version}");
    let exec = |command: &[&str]| {
        let mut args = vec!["vm", "exec", "stock-1", "--"];
        args.extend_from_slice(command);
        cli.output(&args)
    };
    let missing = exec(&["test", "-e", "/usr/sbin/quetzal-agent"]);
    assert_eq!(missing.status.code(), Some(1));
    // GRUB booted it: no kernel was handed to QEMU.
    let cmdline = exec(&["cat", "/proc/cmdline"]);
    assert!(String::from_utf8_lossy(&cmdline.stdout).contains("BOOT_IMAGE=/vmlinuz"));
    // Output and exit codes.
    let answer = exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(answer.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&answer.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&answer.stderr), "err\n");
    // Its name from cloud-init, its address from the agent, the same the
    // network's DHCP server leased.
    wait_until_for("the guest's address", DEBIAN_TIMEOUT, || {
        show(&cli, "stock-1")["addresses"][0].is_string()
    });
    assert_eq!(show(&cli, "stock-1")["agent"]["hostname"], "stock-1");
    // How full its root filesystem is, from the stock agent's fsinfo.
    wait_until_for("the guest's filesystems", DEBIAN_TIMEOUT, || {
        show(&cli, "stock-1")["agent"]["filesystems"]
            .as_array()
            .is_some_and(|list| {
                list.iter().any(|fs| {
                    fs["mountpoint"] == "/"
                        && fs["total_bytes"].as_u64().is_some_and(|t| t > 1 << 30)
                })
            })
    });
    let (_, network) = daemon.request("GET", "/api/v1/networks/default", None);
    let network: Value = serde_json::from_str(&network).unwrap();
    let lease = network["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|lease| lease["vm"] == "stock-1")
        .map(|lease| lease["address"].clone());
    assert_eq!(
        Some(show(&cli, "stock-1")["addresses"][0].clone()),
        lease,
        "{network}"
    );
    // No Quetzal code in the guest: its memory use comes from the
    // balloon driver's statistics, within 5% of the guest's own
    // /proc/meminfo.
    wait_until_for("guest memory from the balloon", DEBIAN_TIMEOUT, || {
        let ours = show(&cli, "stock-1")["guest_memory"].clone();
        let own = exec(&["cat", "/proc/meminfo"]);
        guest_memory_matches(&ours, "balloon", &String::from_utf8_lossy(&own.stdout))
    });
    assert_eq!(show(&cli, "stock-1")["agent"]["port_connected"], false);
    // A 1 MiB file in and out, unchanged.
    let original = scratch.join("random.bin");
    run(Command::new("head")
        .args(["-c", "1048576", "/dev/urandom"])
        .stdout(std::fs::File::create(&original).unwrap()));
    cli.ok(&[
        "vm",
        "cp",
        original.to_str().unwrap(),
        "stock-1:/tmp/random.bin",
    ]);
    let back = scratch.join("back.bin");
    cli.ok(&[
        "vm",
        "cp",
        "stock-1:/tmp/random.bin",
        back.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&back), sha256(&original));
    let inside = exec(&["sha256sum", "/tmp/random.bin"]);
    assert!(String::from_utf8_lossy(&inside.stdout).starts_with(&sha256(&original)));

    // The image cannot go while its VM exists; then it can, entirely.
    cli.fails(&["image", "rm", "stock"], "in use by VM stock-1");
    cli.ok(&["vm", "stop", "stock-1"]);
    cli.ok(&["vm", "rm", "stock-1"]);
    cli.ok(&["image", "rm", "stock"]);
    assert!(!images.join("stock").exists());
    cli.fails(&["image", "rm", "stock"], "no image named stock");
}

/// What the UEFI-only disk's bootloader prints on the serial console.
const UEFI_MARK: &str = "quetzal-uefi: GRUB for UEFI, from the disk";

/// A disk that only UEFI boots: a GPT with one EFI system partition whose
/// fallback bootloader (`EFI/BOOT/BOOTX64.EFI`) is GRUB for UEFI with its
/// config inside (`grub-mkstandalone`): it prints [`UEFI_MARK`] on the
/// serial port and powers off. No BIOS boot code anywhere.
fn uefi_only_disk(dir: &Path) -> PathBuf {
    let config = dir.join("grub.cfg");
    std::fs::write(
        &config,
        format!(
            "serial --unit=0 --speed=115200\nterminal_output --append serial_com0\necho \"{UEFI_MARK}\"\nhalt\n"
        ),
    )
    .unwrap();
    let loader = dir.join("BOOTX64.EFI");
    run(Command::new("grub-mkstandalone")
        .args([
            "-O",
            "x86_64-efi",
            "--locales=",
            "--fonts=",
            "--themes=",
            "-o",
        ])
        .arg(&loader)
        .arg(format!("boot/grub/grub.cfg={}", config.display())));
    let esp = dir.join("esp.img");
    run(Command::new("mkfs.vfat").arg("-C").arg(&esp).arg("32768"));
    run(Command::new("mmd")
        .arg("-i")
        .arg(&esp)
        .args(["::EFI", "::EFI/BOOT"]));
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&esp)
        .arg(&loader)
        .arg("::EFI/BOOT/BOOTX64.EFI"));
    let disk = dir.join("uefi.raw");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(40 << 20).unwrap();
    drop(file);
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().unwrap(),
        b"label: gpt\nstart=2048, size=65536, type=U\n",
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    run(Command::new("dd")
        .arg(format!("if={}", esp.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=512", "seek=2048", "conv=notrunc", "status=none"]));
    disk
}

#[test]
fn a_uefi_only_disk_is_imported_as_uefi_and_ovmf_boots_its_own_bootloader() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let scratch = daemon.data.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    own_images(&daemon);
    let disk = uefi_only_disk(&scratch);

    let imported = cli.output(&["image", "import", "efi-only", disk.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&imported.stderr);
    assert!(imported.status.success(), "{said}");
    assert!(said.contains("uefi firmware"), "{said}");
    cli.ok(&["vm", "create", "efi-1", "--image", "efi-only", "--start"]);

    // OVMF found the bootloader on the disk's EFI system partition; it
    // ran, printed and powered the VM off.
    let console = daemon.data.path().join("vms/efi-1/console.log");
    wait_until_for("the disk's own bootloader", DEBIAN_TIMEOUT, || {
        std::fs::read_to_string(&console).is_ok_and(|log| log.contains(UEFI_MARK))
    });
    wait_until_for("the guest to power off", DEBIAN_TIMEOUT, || {
        show(&cli, "efi-1")["state"] == "stopped"
    });
    // Its own UEFI variables, next to its disk.
    assert!(daemon.data.path().join("vms/efi-1/uefi-vars.fd").is_file());
    cli.ok(&["vm", "rm", "efi-1"]);
    cli.ok(&["image", "rm", "efi-only"]);
}

#[test]
fn files_that_are_not_bootable_disks_are_refused_and_leave_nothing() {
    let daemon = Daemon::start(Path::new(QUETZALD));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    let images = own_images(&daemon);
    let text = daemon.data.path().join("notes.txt");
    std::fs::write(&text, "not a disk\n".repeat(1000)).unwrap();
    let blank = daemon.data.path().join("blank.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&blank)
        .arg("64M"));
    let overlay = daemon.data.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&blank)
        .arg(&overlay));

    let import = |name: &str, file: &Path, says: &str| {
        cli.fails(&["image", "import", name, file.to_str().unwrap()], says);
    };
    import("notes", &text, "not a bootable disk image");
    import("blank", &blank, "not a bootable disk image");
    import("overlay", &overlay, "is an overlay on");
    import(
        "gone",
        Path::new("/nonexistent/disk.qcow2"),
        "cannot read it",
    );
    import("tiny", &blank, "Quetzal builds an image of that name");
    import("Bad_Name", &blank, "is not allowed");

    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 0);
}
