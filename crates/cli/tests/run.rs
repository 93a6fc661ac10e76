//! `quetzal run` end to end: the real binary, real QEMU, the real tiny guest.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use nix::sys::signal::Signal;
use quetzal_testkit::{DataDir, Quetzal, assert_no_process_mentions, tiny};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");

fn run(data: &DataDir, args: &[&str]) -> Quetzal {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    Quetzal::spawn(Path::new(QUETZAL), data.path(), &full)
}

/// `Memory: 87064K/130552K available` -> 130552 (KiB the kernel manages).
fn kernel_memory_kib(dmesg_line: &str) -> u64 {
    let field = dmesg_line.split("Memory: ").nth(1).expect("a Memory: line");
    let total = field.split('/').nth(1).expect("used/total");
    total
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .split('K')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn boots_tiny_runs_a_command_and_exits_zero_on_poweroff() {
    let data = DataDir::new();
    let mut vm = run(&data, &[]);
    vm.wait_prompt_after(0);

    let output = vm.command("echo hello from $(uname -s) $((6 * 7))");
    vm.send_line("poweroff");

    assert_eq!(output.trim(), "hello from Linux 42");
    assert_eq!(vm.wait(), 0, "stderr: {}", vm.stderr.text());
    assert_no_process_mentions(&data.path().display().to_string());
}

#[test]
fn guest_has_one_vcpu_and_128_mib_when_asked() {
    let data = DataDir::new();
    let mut vm = run(&data, &["--cpus", "1", "--memory", "128"]);
    vm.wait_prompt_after(0);

    let cpus = vm.command("nproc");
    let memory = vm.command("dmesg | grep 'Memory:'");
    vm.send_line("poweroff");

    assert_eq!(cpus.trim(), "1");
    let kib = kernel_memory_kib(&memory);
    assert!((120 * 1024..=128 * 1024).contains(&kib), "{memory}");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn guest_has_two_vcpus_and_1_gib_when_asked() {
    let data = DataDir::new();
    let mut vm = run(&data, &["--cpus", "2", "--memory", "1024"]);
    vm.wait_prompt_after(0);

    let cpus = vm.command("nproc");
    let memory = vm.command("dmesg | grep 'Memory:'");
    vm.send_line("poweroff");

    assert_eq!(cpus.trim(), "2");
    let kib = kernel_memory_kib(&memory);
    assert!((1000 * 1024..=1024 * 1024).contains(&kib), "{memory}");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn named_vm_keeps_its_files_across_boots_and_never_writes_the_base() {
    let data = DataDir::new();
    let base = tiny().root_disk();
    let before = quetzal_image::sha256_file(&base).unwrap();

    let mut first = run(&data, &["--name", "keeper"]);
    first.wait_prompt_after(0);
    let root = first.command("awk '$2 == \"/\" { print $1, $3 }' /proc/mounts");
    first.command("echo kept-across-boots > /root/note && sync");
    first.send_line("poweroff");
    assert_eq!(first.wait(), 0);

    let mut second = run(&data, &["--name", "keeper"]);
    second.wait_prompt_after(0);
    let note = second.command("cat /root/note");
    second.send_line("poweroff");
    assert_eq!(second.wait(), 0);

    assert_eq!(root.trim(), "/dev/vda ext4");
    assert_eq!(note.trim(), "kept-across-boots");
    assert_eq!(quetzal_image::sha256_file(&base).unwrap(), before);
    assert!(data.path().join("run/keeper/root.qcow2").exists());
}

#[test]
fn unnamed_vm_starts_from_a_clean_disk() {
    let data = DataDir::new();
    let mut first = run(&data, &[]);
    first.wait_prompt_after(0);
    first.command("echo scratch > /root/scratch && sync");
    first.send_line("poweroff");
    assert_eq!(first.wait(), 0);

    let mut second = run(&data, &[]);
    second.wait_prompt_after(0);
    let listing = second.command("ls /root/scratch 2>&1");
    second.send_line("poweroff");

    assert!(listing.contains("No such file"), "{listing}");
    assert_eq!(second.wait(), 0);
}

#[test]
fn boots_any_kernel_with_kernel_initrd_and_append() {
    let data = DataDir::new();
    let image = tiny();
    let kernel = image.kernel().unwrap().display().to_string();
    let initrd = image.initrd().unwrap().display().to_string();
    let mut vm = run(
        &data,
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--append",
            "console=ttyS0 quiet quetzal.marker=7",
            "--net",
            "none",
        ],
    );
    vm.wait_prompt_after(0);

    let cmdline = vm.command("cat /proc/cmdline");
    let root = vm.command("awk '$2 == \"/\" { print $1 }' /proc/mounts");
    vm.send_line("poweroff");

    assert!(cmdline.contains("quetzal.marker=7"), "{cmdline}");
    assert_eq!(root.trim(), "rootfs");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn extra_disk_is_attached_as_the_next_virtio_disk() {
    let data = DataDir::new();
    let disk = data.path().join("extra.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mut vm = run(&data, &["--disk", &disk.display().to_string()]);
    vm.wait_prompt_after(0);

    let size = vm.command("cat /sys/block/vdb/size");
    vm.send_line("poweroff");

    assert_eq!(size.trim(), "8192");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn guest_gets_an_address_by_dhcp_on_its_nic() {
    let data = DataDir::new();
    let mut vm = run(&data, &["--net", "user"]);
    vm.wait_prompt_after(0);

    let address = vm.command(
        "i=0; while ! ip -4 addr show eth0 | grep -q inet && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; ip -4 addr show eth0 | awk '/inet / { print $2 }'",
    );
    vm.send_line("poweroff");

    assert_eq!(address.trim(), "10.0.2.15/24");
    assert_eq!(vm.wait(), 0);
}

#[test]
fn guest_kernel_panic_ends_the_run_with_an_error() {
    let data = DataDir::new();
    let mut vm = run(&data, &[]);
    vm.wait_prompt_after(0);

    vm.send_line("echo c > /proc/sysrq-trigger");
    let code = vm.wait();

    assert_eq!(code, 1);
    let stderr = vm.stderr.text();
    assert_eq!(
        stderr.trim(),
        "quetzal: guest crashed: the guest kernel panicked"
    );
    assert_no_process_mentions(&data.path().display().to_string());
}

#[test]
fn sigterm_stops_the_vm_and_leaves_no_qemu() {
    let data = DataDir::new();
    let vm = run(&data, &[]);
    vm.wait_prompt_after(0);

    vm.signal(Signal::SIGTERM);
    let mut vm = vm;
    let code = vm.wait();

    assert_eq!(code, 128 + 15);
    assert_no_process_mentions(&data.path().display().to_string());
}

#[test]
fn sigkill_of_quetzal_takes_its_qemu_along() {
    let data = DataDir::new();
    let vm = run(&data, &[]);
    vm.wait_prompt_after(0);
    let marker = data.path().display().to_string();
    assert_eq!(
        quetzal_testkit::processes_mentioning(&marker).len(),
        1,
        "its QEMU"
    );

    vm.signal(Signal::SIGKILL);

    assert_no_process_mentions(&marker);
}

#[test]
fn qemu_killed_under_a_running_vm_ends_the_run_with_an_error() {
    let data = DataDir::new();
    let mut vm = run(&data, &[]);
    vm.wait_prompt_after(0);
    let marker = data.path().display().to_string();
    let qemu = quetzal_testkit::processes_mentioning(&marker);
    assert_eq!(qemu.len(), 1, "one QEMU");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(qemu[0]).unwrap());
    nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
    let code = vm.wait();

    assert_eq!(code, 1);
    let stderr = vm.stderr.text();
    assert!(
        stderr.starts_with("quetzal: QEMU exited unexpectedly: signal: 9"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn on_a_terminal_ctrl_right_bracket_stops_the_vm() {
    let data = DataDir::new();
    // script(1) gives quetzal a real pseudo-terminal and forwards our bytes.
    let command = format!("{QUETZAL} run");
    let mut vm = Quetzal::spawn(
        Path::new("script"),
        data.path(),
        &["-qfec", &command, "/dev/null"],
    );
    vm.stdout.wait_for("Ctrl-] stops the VM");
    vm.wait_prompt_after(0);
    let output = vm.command("echo typed-on-a-$((1 + 1))-terminal");
    assert_eq!(output, "typed-on-a-2-terminal");

    vm.send_raw(&[0x1d]);

    assert_eq!(vm.wait(), 0);
    vm.stdout.wait_for("VM stopped (Ctrl-])");
    assert_no_process_mentions(&data.path().display().to_string());
}
