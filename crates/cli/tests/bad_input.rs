//! Every bad input to `quetzal run`, `host` and `image` gets one clear
//! line on stderr and a non-zero exit: no panic, no hang, no QEMU left.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::{Command, Output};

use quetzal_testkit::{DataDir, assert_no_process_mentions, tiny};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");

fn quetzal(data: &DataDir, args: &[&str]) -> Output {
    Command::new(QUETZAL)
        .args(args)
        .env("QUETZAL_DATA_DIR", data.path())
        .output()
        .expect("quetzal runs")
}

/// Asserts a failure with exactly one line on stderr containing `expected`.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("quetzal: "), "{stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn assert_rejected(args: &[&str], expected: &str) {
    let data = DataDir::new();
    let mut full = vec!["run"];
    full.extend_from_slice(args);

    let output = quetzal(&data, &full);

    assert_one_line_error(&output, expected);
    assert_no_process_mentions(&data.path().display().to_string());
}

#[test]
fn rejects_a_missing_kernel() {
    assert_rejected(
        &["--kernel", "/nonexistent/vmlinuz"],
        "cannot read kernel /nonexistent/vmlinuz",
    );
}

#[test]
fn rejects_a_directory_as_kernel() {
    assert_rejected(&["--kernel", "/tmp"], "cannot read kernel /tmp");
}

#[test]
fn rejects_a_file_that_is_not_a_kernel() {
    let data = DataDir::new();
    let fake = data.path().join("vmlinuz");
    std::fs::write(&fake, "#!/bin/sh\necho I am no kernel\n").unwrap();

    assert_rejected(
        &["--kernel", &fake.display().to_string()],
        "is not a Linux kernel",
    );
}

#[test]
fn rejects_a_missing_initrd() {
    let kernel = tiny().kernel().unwrap().display().to_string();

    assert_rejected(
        &["--kernel", &kernel, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd /nonexistent/initrd",
    );
}

#[test]
fn rejects_a_missing_disk() {
    assert_rejected(
        &["--disk", "/nonexistent/disk.qcow2"],
        "cannot read disk /nonexistent/disk.qcow2",
    );
}

#[test]
fn rejects_an_initrd_without_a_kernel() {
    assert_rejected(&["--initrd", "/tmp/x"], "--kernel");
}

#[test]
fn rejects_zero_cpus() {
    assert_rejected(&["--cpus", "0"], "--cpus must be between 1 and 255, not 0");
}

#[test]
fn rejects_more_cpus_than_the_engine_supports() {
    assert_rejected(
        &["--cpus", "256"],
        "--cpus must be between 1 and 255, not 256",
    );
}

#[test]
fn rejects_a_non_numeric_cpu_count() {
    assert_rejected(&["--cpus", "two"], "invalid value 'two'");
}

#[test]
fn rejects_zero_memory() {
    assert_rejected(
        &["--memory", "0"],
        "--memory must be at least 32 MiB, not 0 MiB",
    );
}

#[test]
fn rejects_more_memory_than_the_host_has() {
    assert_rejected(&["--memory", "100000000"], "is more than this host has");
}

#[test]
fn rejects_an_unknown_image() {
    assert_rejected(
        &["--image", "windows-95"],
        "unknown image 'windows-95' (Quetzal builds tiny, debian, desktop; others come from: quetzal image import NAME FILE)",
    );
}

#[test]
fn rejects_an_invalid_vm_name() {
    assert_rejected(&["--name", "../etc"], "invalid VM name '../etc'");
}

#[test]
fn rejects_an_unknown_accelerator() {
    assert_rejected(&["--accel", "hvf"], "unknown accelerator 'hvf'");
}

#[test]
fn rejects_accel_kvm_on_a_host_without_hardware_virtualization() {
    let data = DataDir::new();
    let info = quetzal(&data, &["host", "info", "--output", "json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    if info["hardware_virtualization"] == true {
        eprintln!("this host has hardware virtualization: nothing to check");
        return;
    }

    assert_rejected(&["--accel", "kvm"], "--accel kvm cannot work on this host");
}

#[test]
fn says_when_qemu_is_not_installed() {
    let data = DataDir::new();
    let output = Command::new(QUETZAL)
        .args(["run"])
        .env("QUETZAL_DATA_DIR", data.path())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();

    assert_one_line_error(
        &output,
        "QEMU is not installed: qemu-system-x86_64 not found",
    );
}

#[test]
fn says_how_to_build_an_image_that_is_not_built() {
    let empty = tempfile::tempdir_in(quetzal_testkit::tests_root()).unwrap();
    let output = Command::new(QUETZAL)
        .args(["run"])
        .env("QUETZAL_DATA_DIR", empty.path())
        .output()
        .unwrap();

    assert_one_line_error(
        &output,
        "image 'tiny' is not built yet; run: quetzal image build tiny",
    );
}

#[test]
fn rejects_a_second_run_of_the_same_named_vm() {
    let data = DataDir::new();
    let first = quetzal_testkit::Quetzal::spawn(
        Path::new(QUETZAL),
        data.path(),
        &["run", "--name", "solo"],
    );
    first.wait_prompt_after(0);

    let second = quetzal(&data, &["run", "--name", "solo"]);

    assert_one_line_error(&second, "VM solo is already running");
}

#[test]
fn rejects_building_an_unknown_image() {
    let data = DataDir::new();

    let output = quetzal(&data, &["image", "build", "windows-95"]);

    assert_one_line_error(&output, "unknown image 'windows-95'");
}

#[test]
fn says_which_package_to_install_when_a_build_tool_is_missing() {
    let empty = tempfile::tempdir_in(quetzal_testkit::tests_root()).unwrap();
    let bin = empty.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["apt-get", "apt-cache", "dpkg-deb", "qemu-img"] {
        let real = which(tool);
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let output = Command::new(QUETZAL)
        .args(["image", "build"])
        .env("QUETZAL_DATA_DIR", empty.path())
        .env("PATH", &bin)
        .output()
        .unwrap();

    assert_one_line_error(
        &output,
        "mkfs.ext4 is not installed (install the e2fsprogs package)",
    );
    assert!(!empty.path().join("images/tiny/current").exists());
}

#[test]
fn a_failed_download_leaves_no_image_that_looks_complete() {
    let empty = tempfile::tempdir_in(quetzal_testkit::tests_root()).unwrap();
    let bin = empty.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["apt-cache", "dpkg-deb", "qemu-img", "mkfs.ext4"] {
        std::os::unix::fs::symlink(which(tool), bin.join(tool)).unwrap();
    }
    // Stands in for apt-get when the mirror is unreachable.
    let apt_get = bin.join("apt-get");
    std::fs::write(&apt_get, "#!/bin/sh\necho 'E: Failed to fetch http://deb.debian.org/x.deb  Could not resolve host' >&2\nexit 100\n").unwrap();
    std::fs::set_permissions(
        &apt_get,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let output = Command::new(QUETZAL)
        .args(["image", "build"])
        .env("QUETZAL_DATA_DIR", empty.path())
        .env("PATH", &bin)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(!output.status.success());
    assert!(
        last.starts_with("quetzal: cannot download linux-image-"),
        "{stderr}"
    );
    assert!(last.contains("Could not resolve host"), "{stderr}");
    assert!(!empty.path().join("images/tiny/current").exists());
    let run = Command::new(QUETZAL)
        .args(["run"])
        .env("QUETZAL_DATA_DIR", empty.path())
        .output()
        .unwrap();
    assert_one_line_error(&run, "image 'tiny' is not built yet");
}

fn which(tool: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{tool} is installed"))
}
