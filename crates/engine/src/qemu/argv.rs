//! The `qemu-system-x86_64` command line for a [`VmSpec`]: a pure function,
//! so every flag is visible in one place and in its tests.

use std::ffi::OsString;
use std::path::Path;

use crate::accel::Accel;
use crate::spec::{Boot, Machine, NicBackend, Ram, TCG_CACHE_MIB, VmSpec};

use super::RunPaths;
use super::sandbox::FIRST_TAP_FD;

/// QEMU's option parser splits on `,`; a literal comma is written `,,`.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Builds the argument list (without the program name). The VM starts
/// paused (`-S`) so the caller can attach the console before the first byte
/// of output, then resume it with `cont`.
pub fn argv(spec: &VmSpec, paths: &RunPaths) -> Vec<OsString> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    // QEMU's seccomp filter: no obsolete system calls, no gaining
    // privileges, no new processes, no changing its own scheduling.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    match spec.machine {
        Machine::Pc => push(&["-machine", "pc"]),
    }
    // A file-backed RAM is a backend object the machine takes as its RAM.
    let ram_file = match &spec.ram {
        Ram::Anonymous => None,
        Ram::Shared { file } => Some((file, "on")),
        Ram::Template { file } => Some((file, "off")),
    };
    if let Some((file, share)) = ram_file {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share={share}",
                spec.memory.get(),
                escape(file)
            ),
            "-machine",
            "memory-backend=ram0",
        ]);
    }
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_CACHE_MIB}")]),
    }
    push(&["-smp", &spec.cpus.get().to_string()]);
    push(&["-m", &format!("{}M", spec.memory.get())]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&paths.qmp)
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            escape(&paths.console),
            escape(&paths.console_log)
        ),
        "-serial",
        "chardev:console",
    ]);

    // A screen, and a USB tablet: an absolute pointer, so the guest's
    // cursor is where the VNC client's is (a PS/2 mouse only moves).
    // virtio-vga is a VGA for firmware and text consoles and a virtio GPU
    // for a guest with its driver, which learns of a VNC client's
    // SetDesktopSize (QEMU's `ui_info`) as a display change: a guest that
    // follows it takes the browser window's size (std VGA cannot). VNC
    // may use lossy encodings (Tight's JPEG for changing regions) for
    // clients that ask for a JPEG quality, as noVNC does.
    if spec.graphics {
        push(&[
            "-vga",
            "virtio",
            "-vnc",
            &format!("unix:{},lossy=on", escape(&paths.vnc)),
            "-device",
            "qemu-xhci,id=usb",
            "-device",
            "usb-tablet,bus=usb.0",
        ]);
    }

    match &spec.boot {
        Boot::Kernel(direct) => {
            push(&["-kernel", &direct.kernel().display().to_string()]);
            if let Some(initrd) = direct.initrd() {
                push(&["-initrd", &initrd.display().to_string()]);
            }
            if !direct.append.is_empty() {
                push(&["-append", &direct.append]);
            }
        }
        // SeaBIOS is QEMU's default firmware.
        Boot::Bios => {}
        Boot::Uefi(uefi) => push(&[
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=uefi-code,read-only=on",
                escape(uefi.code())
            ),
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=uefi-vars",
                escape(uefi.vars())
            ),
            "-machine",
            "pflash0=uefi-code,pflash1=uefi-vars",
        ]),
    }
    // Firmware boots the first disk, never another disk or the network.
    let firmware = !matches!(spec.boot, Boot::Kernel(_));

    for (index, disk) in spec.disks.iter().enumerate() {
        let read_only = if disk.read_only { ",read-only=on" } else { "" };
        push(&[
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=file{index}{read_only}",
                escape(&disk.path)
            ),
            "-blockdev",
            &format!(
                "driver={},file=file{index},node-name=disk{index}{read_only}",
                disk.format.as_str()
            ),
            "-device",
            &if firmware && index == 0 {
                format!("virtio-blk-pci,drive=disk{index},bootindex=0")
            } else {
                format!("virtio-blk-pci,drive=disk{index}")
            },
        ]);
    }

    // TAP devices are opened by the daemon and handed over as fds 3, 4, …
    // in the order of the NICs that use one (see `sandbox`).
    let mut tap_fd = FIRST_TAP_FD;
    for (index, nic) in spec.nics.iter().enumerate() {
        match &nic.backend {
            NicBackend::User => push(&["-netdev", &format!("user,id=net{index}")]),
            NicBackend::Tap { .. } => {
                push(&["-netdev", &format!("tap,id=net{index},fd={tap_fd}")]);
                tap_fd += 1;
            }
        }
        // romfile= skips the iPXE option ROM: nothing boots from the network.
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net{index},mac={},romfile=", nic.mac),
        ]);
    }

    // The guest agent's channel: a virtio-serial port named as stock
    // qemu-guest-agent expects, and Quetzal's own beside it, each on a
    // socket the node connects to.
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    for (id, socket, name) in [
        ("agent", &paths.agent, quetzal_qga::QGA_PORT),
        ("port", &paths.port, quetzal_qga::port::QUETZAL_PORT),
    ] {
        push(&[
            "-chardev",
            &format!("socket,id={id},path={},server=on,wait=off", escape(socket)),
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev={id},name={name}"),
        ]);
    }

    // A balloon: the memory statistics its driver in the guest reports
    // (how much memory a guest without an agent uses), and for anonymous
    // RAM free-page reporting, which gives pages the guest frees back to
    // the host. Not for RAM in a file: QEMU 7.2 discards a reported page
    // of a file by punching a hole in it — even a template's, mapped
    // private (8.1 fixed that) — and a warm template's clones restore
    // its device state, which must match their own devices.
    let reporting = if matches!(spec.ram, Ram::Anonymous) {
        ",free-page-reporting=on"
    } else {
        ""
    };
    push(&[
        "-device",
        &format!("virtio-balloon-pci,id=balloon0{reporting}"),
    ]);
    // Lets the guest report a kernel panic (GUEST_PANICKED), which QEMU
    // then turns into a shutdown with reason guest-panic.
    push(&["-device", "pvpanic"]);
    // A hardware watchdog for a guest watchdog daemon: when the daemon
    // stops feeding it, QEMU resets the guest (and says so: WATCHDOG).
    push(&["-device", "i6300esb", "-action", "watchdog=reset"]);
    // A generation id the guest's kernel watches: a new one tells a clone
    // restored from its template's state that it is a copy.
    push(&["-device", &format!("vmgenid,guid={}", spec.generation_id)]);
    // A restored VM waits for its device state (handed over as an fd and
    // loaded over QMP, where the capabilities are set first).
    if spec.restore.is_some() {
        push(&["-incoming", "defer"]);
    }

    args.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;
    use crate::spec::{Cpus, DirectBoot, Disk, DiskFormat, Mac, MemoryMib, Nic, Uefi, VmName};

    fn kernel() -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&image).unwrap();
        file
    }

    fn spec(kernel: &Path, accel: Accel) -> VmSpec {
        VmSpec {
            name: VmName::new("web-1").unwrap(),
            cpus: Cpus::new(2).unwrap(),
            memory: MemoryMib::new(512, 4096).unwrap(),
            machine: Machine::Pc,
            accel,
            boot: Boot::Kernel(DirectBoot::new(kernel, None, "console=ttyS0").unwrap()),
            disks: vec![],
            nics: vec![],
            graphics: false,
            confinement: Default::default(),
            ram: Ram::Anonymous,
            generation_id: "6f5d2a4e-9c1b-4e8a-b7d3-0a1b2c3d4e5f".to_owned(),
            restore: None,
            cpu_pin: None,
        }
    }

    fn paths() -> RunPaths {
        RunPaths::new(Path::new("/run/q/web-1"))
    }

    fn text(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn starts_paused_with_qmp_and_console_sockets() {
        let kernel = kernel();

        let args = text(&argv(&spec(kernel.path(), Accel::Tcg), &paths()));

        assert!(args.contains(" -S "), "{args}");
        assert!(args.contains("socket,id=qmp,path=/run/q/web-1/qmp.sock,server=on,wait=off"));
        assert!(args.contains("-mon chardev=qmp,mode=control"));
        assert!(args.contains("-serial chardev:console"));
        assert!(args.contains("logfile=/run/q/web-1/console.log,logappend=on"));
    }

    #[test]
    fn sets_cpus_memory_and_kernel_command_line() {
        let kernel = kernel();

        let args = argv(&spec(kernel.path(), Accel::Tcg), &paths());
        let text = text(&args);

        assert!(text.contains("-smp 2 -m 512M"), "{text}");
        assert!(args.contains(&OsString::from("console=ttyS0")));
    }

    #[test]
    fn uses_tcg_without_host_cpu() {
        let kernel = kernel();

        let args = text(&argv(&spec(kernel.path(), Accel::Tcg), &paths()));

        assert!(args.contains("-accel tcg,tb-size=256"), "{args}");
        assert!(!args.contains("-cpu host"));
    }

    #[test]
    fn uses_kvm_with_host_cpu() {
        let kernel = kernel();

        let args = text(&argv(&spec(kernel.path(), Accel::Kvm), &paths()));

        assert!(args.contains("-accel kvm -cpu host"));
    }

    fn two_disks() -> Vec<Disk> {
        ["/d/root.qcow2", "/d/seed.iso"]
            .into_iter()
            .map(|path| Disk {
                path: PathBuf::from(path),
                format: DiskFormat::Raw,
                read_only: false,
            })
            .collect()
    }

    #[test]
    fn gives_every_guest_a_watchdog_that_resets_it() {
        let kernel = kernel();

        let args = text(&argv(&spec(kernel.path(), Accel::Tcg), &paths()));

        assert!(
            args.contains("-device i6300esb -action watchdog=reset"),
            "{args}"
        );
    }

    #[test]
    fn gives_every_guest_both_agent_ports_and_a_balloon_for_memory_figures() {
        let kernel = kernel();

        let args = text(&argv(&spec(kernel.path(), Accel::Tcg), &paths()));

        for port in ["org.qemu.guest_agent.0", "org.quetzal.agent.0"] {
            assert!(args.contains(&format!("name={port}")), "{args}");
        }
        assert!(
            args.contains("chardev=port,name=org.quetzal.agent.0"),
            "{args}"
        );
        assert!(
            args.contains("-device virtio-balloon-pci,id=balloon0"),
            "{args}"
        );
    }

    #[test]
    fn boots_the_first_disk_with_seabios_and_no_kernel() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        spec.boot = Boot::Bios;
        spec.disks = two_disks();

        let args = text(&argv(&spec, &paths()));

        assert!(!args.contains("-kernel"), "{args}");
        assert!(!args.contains("pflash"), "{args}");
        assert!(
            args.contains("virtio-blk-pci,drive=disk0,bootindex=0"),
            "{args}"
        );
        assert!(args.contains("virtio-blk-pci,drive=disk1 "), "{args}");
    }

    #[test]
    fn boots_with_ovmf_code_read_only_and_the_vms_own_variables() {
        let dir = tempfile::tempdir().unwrap();
        let (code, template) = (dir.path().join("code.fd"), dir.path().join("vars.fd"));
        std::fs::write(&code, b"code").unwrap();
        std::fs::write(&template, b"empty vars").unwrap();
        let vars = dir.path().join("vm-vars.fd");
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        spec.boot = Boot::Uefi(Uefi::with_firmware(&code, &template, &vars).unwrap());
        spec.disks = two_disks();

        let args = text(&argv(&spec, &paths()));

        assert!(
            args.contains(&format!(
                "driver=file,filename={},node-name=uefi-code,read-only=on",
                code.display()
            )),
            "{args}"
        );
        assert!(args.contains(&format!(
            "driver=file,filename={},node-name=uefi-vars ",
            vars.display()
        )));
        assert!(args.contains("-machine pflash0=uefi-code,pflash1=uefi-vars"));
        assert!(args.contains("drive=disk0,bootindex=0"));
        assert_eq!(std::fs::read(&vars).unwrap(), b"empty vars");
    }

    #[test]
    fn keeps_a_vms_uefi_variables_and_names_missing_firmware() {
        let dir = tempfile::tempdir().unwrap();
        let (code, template) = (dir.path().join("code.fd"), dir.path().join("vars.fd"));
        std::fs::write(&code, b"code").unwrap();
        std::fs::write(&template, b"empty vars").unwrap();
        let vars = dir.path().join("vm-vars.fd");
        std::fs::write(&vars, b"boot entries").unwrap();

        Uefi::with_firmware(&code, &template, &vars).unwrap();
        let missing = Uefi::with_firmware(&dir.path().join("none.fd"), &template, &vars);

        assert_eq!(std::fs::read(&vars).unwrap(), b"boot entries");
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("install the ovmf package")
        );
    }

    #[test]
    fn attaches_disks_in_order_as_virtio_blk() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        spec.disks = vec![
            Disk {
                path: PathBuf::from("/d/root.qcow2"),
                format: DiskFormat::Qcow2,
                read_only: false,
            },
            Disk {
                path: PathBuf::from("/d/data,1.img"),
                format: DiskFormat::Raw,
                read_only: true,
            },
        ];

        let args = text(&argv(&spec, &paths()));

        assert!(args.contains("driver=file,filename=/d/root.qcow2,node-name=file0 "));
        assert!(args.contains("driver=qcow2,file=file0,node-name=disk0 "));
        assert!(args.contains("filename=/d/data,,1.img,node-name=file1,read-only=on"));
        assert!(args.contains("driver=raw,file=file1,node-name=disk1,read-only=on"));
        assert!(args.find("drive=disk0") < args.find("drive=disk1"));
    }

    #[test]
    fn gives_each_nic_its_mac_and_no_option_rom() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        spec.nics = vec![Nic {
            mac: Mac::local(1),
            backend: NicBackend::User,
        }];

        let args = text(&argv(&spec, &paths()));

        assert!(args.contains("-netdev user,id=net0"));
        assert!(args.contains("virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,romfile="));
    }

    #[test]
    fn graphics_add_a_virtio_vga_served_lossy_over_vnc_on_a_unix_socket_only_and_a_tablet() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        assert!(!text(&argv(&spec, &paths())).contains("-vnc"));

        spec.graphics = true;
        let args = text(&argv(&spec, &paths()));

        assert!(
            args.contains("-vga virtio -vnc unix:/run/q/web-1/vnc.sock,lossy=on"),
            "{args}"
        );
        assert!(
            args.contains("-device qemu-xhci,id=usb -device usb-tablet,bus=usb.0"),
            "{args}"
        );
    }

    #[test]
    fn a_tap_nic_names_its_device_and_runs_no_scripts() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        spec.nics = vec![Nic {
            mac: Mac::local(2),
            backend: NicBackend::Tap {
                ifname: "qz12345t00abcd".into(),
            },
        }];

        let args = text(&argv(&spec, &paths()));

        assert!(args.contains("-netdev tap,id=net0,fd=3"));
    }

    #[test]
    fn a_shared_ram_file_is_written_through_and_a_template_one_mapped_private() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        let anonymous = text(&argv(&spec, &paths()));

        spec.ram = Ram::Shared {
            file: PathBuf::from("/dev/shm/q/web-1.ram"),
        };
        let shared = text(&argv(&spec, &paths()));
        spec.ram = Ram::Template {
            file: PathBuf::from("/t/ram"),
        };
        let template = text(&argv(&spec, &paths()));

        assert!(
            shared.contains(
                "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/q/web-1.ram,share=on \
                 -machine memory-backend=ram0"
            ),
            "{shared}"
        );
        assert!(template.contains("mem-path=/t/ram,share=off"), "{template}");
        // Only anonymous RAM is the host's memory again when the guest
        // frees it: QEMU 7.2 would punch holes in a file, a template's too.
        assert!(!anonymous.contains("memory-backend"), "{anonymous}");
        let reporting = "virtio-balloon-pci,id=balloon0,free-page-reporting=on";
        assert!(anonymous.contains(reporting), "{anonymous}");
        assert!(!shared.contains("free-page-reporting"), "{shared}");
        assert!(!template.contains("free-page-reporting"), "{template}");
    }

    #[test]
    fn a_restored_vm_waits_for_its_state_and_every_vm_has_a_generation_id() {
        let kernel = kernel();
        let mut spec = spec(kernel.path(), Accel::Tcg);
        let booted = text(&argv(&spec, &paths()));

        spec.restore = Some(PathBuf::from("/t/state"));
        let restored = text(&argv(&spec, &paths()));

        assert!(!booted.contains("-incoming"));
        assert!(restored.contains("-incoming defer"), "{restored}");
        for args in [booted, restored] {
            assert!(
                args.contains("-device vmgenid,guid=6f5d2a4e-9c1b-4e8a-b7d3-0a1b2c3d4e5f"),
                "{args}"
            );
        }
    }
}
