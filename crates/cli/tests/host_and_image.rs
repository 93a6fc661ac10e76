//! `quetzal host info` and `quetzal image build|list` through the binary.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::process::Command;

use quetzal_testkit::{DataDir, shared_data_dir, tiny};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");

fn quetzal(data: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(QUETZAL)
        .args(args)
        .env("QUETZAL_DATA_DIR", data)
        .output()
        .unwrap()
}

#[test]
fn host_info_json_names_the_accelerator_and_why() {
    let data = DataDir::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_flag = quetzal_engine::accel::virt_flag(&cpuinfo).is_some();

    let output = quetzal(data.path(), &["host", "info", "--output", "json"]);
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert!(output.status.success());
    let accel = info["accel"].as_str().unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{info}");
    assert_eq!(accel == "kvm", info["hardware_virtualization"] == true);
    assert_eq!(info["cpu_virt_flag"].is_null(), !has_flag);
    assert!(!info["accel_reason"].as_str().unwrap().is_empty());
    assert!(info["cpus"].as_u64().unwrap() >= 1);
    assert!(info["memory_mib"].as_u64().unwrap() > 0);
    assert!(
        info["qemu_version"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric)
    );
}

#[test]
fn host_info_for_people_shows_acceleration_with_its_reason() {
    let data = DataDir::new();

    let output = quetzal(data.path(), &["host", "info"]);
    let text = String::from_utf8(output.stdout).unwrap();

    assert!(output.status.success());
    let line = text
        .lines()
        .find(|l| l.starts_with("Acceleration"))
        .unwrap();
    assert!(line.contains("tcg: ") || line.contains("kvm: "), "{line}");
}

#[test]
fn host_info_honours_an_accel_tcg_override() {
    let data = DataDir::new();

    let output = quetzal(
        data.path(),
        &["host", "info", "--output", "json", "--accel", "tcg"],
    );
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(info["accel"], "tcg");
    assert!(
        info["accel_reason"]
            .as_str()
            .unwrap()
            .contains("--accel tcg")
    );
}

#[test]
fn a_second_image_build_says_it_is_up_to_date() {
    tiny();

    let output = quetzal(&shared_data_dir(), &["image", "build", "tiny"]);
    let stderr = String::from_utf8(output.stderr).unwrap();

    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("image tiny is up to date"), "{stderr}");
}

#[test]
fn the_manifest_records_package_versions_and_file_hashes() {
    let image = tiny();

    let files = [
        (
            image.manifest.kernel.as_ref().unwrap(),
            image.kernel().unwrap(),
        ),
        (
            image.manifest.initrd.as_ref().unwrap(),
            image.initrd().unwrap(),
        ),
        (&image.manifest.root_disk, image.root_disk()),
    ];

    for (record, path) in files {
        let (sha256, bytes) = quetzal_image::sha256_file(&path).unwrap();
        assert_eq!(record.sha256, sha256, "{}", path.display());
        assert_eq!(record.bytes, bytes);
    }
    let names: Vec<&str> = image
        .manifest
        .packages
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert!(names[0].starts_with("linux-image-") && names[0].ends_with("-cloud-amd64"));
    assert_eq!(names[1], "busybox-static");
    assert!(image.manifest.modules.contains(&"virtio_blk".to_owned()));
}

#[test]
fn the_root_disk_is_a_qcow2_ext4_image_qemu_img_accepts() {
    let image = tiny();

    let output = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(image.root_disk())
        .output()
        .unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image.root_disk())
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 256 * 1024 * 1024);
}

#[test]
fn image_list_shows_tiny_as_built() {
    let output = quetzal(&shared_data_dir(), &["image", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(list[0]["name"], "tiny");
    assert_eq!(list[0]["built"], true);
}
