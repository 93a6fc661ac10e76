//! Images imported from a disk file that has its own bootloader (the
//! Debian and Ubuntu cloud images people download): checked with
//! `qemu-img`, their firmware found from the partition table, stored as a
//! read-only qcow2 under `images/NAME/import-<sha256>/`, like a build.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::{
    BootFrom, CloudInit, Firmware, IMAGES, ImageError, ImageStore, Manifest, apt, lock, now_unix,
    record, remove_dir_if_exists, sha256_file, valid_name,
};

/// What `qemu-img info --output=json` says of a file.
#[derive(Debug, Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// How an import's firmware is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirmwareChoice {
    /// From the disk: BIOS boot code in its MBR, else an EFI system
    /// partition.
    Detect,
    Given(Firmware),
}

/// The EFI system partition's GPT type, as stored (mixed-endian).
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

/// The firmware a disk's first sectors say it boots with, or why none.
pub fn detect_firmware(head: &[u8]) -> Result<Firmware, String> {
    if head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        return Err(
            "it is not a bootable disk image (no boot sector or partition table)".to_owned(),
        );
    }
    // GRUB, syslinux or any other BIOS loader leaves code before the
    // partition table; a GPT disk made for UEFI only has zeros there.
    if head[..440].iter().any(|b| *b != 0) {
        return Ok(Firmware::Bios);
    }
    let protective = (0..4).any(|i| head[446 + 16 * i + 4] == 0xee);
    if protective && has_esp(head) {
        return Ok(Firmware::Uefi);
    }
    Err("it has no bootloader: no BIOS boot code and no EFI system partition".to_owned())
}

/// Whether the GPT in `head` (header at LBA 1) lists an EFI system
/// partition among the entries `head` holds.
fn has_esp(head: &[u8]) -> bool {
    let Some(header) = head.get(512..512 + 92) else {
        return false;
    };
    if &header[..8] != b"EFI PART" {
        return false;
    }
    let u32_at = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let first_lba = u64::from_le_bytes(header[72..80].try_into().unwrap_or([0; 8]));
    let (count, size) = (u32_at(80) as usize, u32_at(84) as usize);
    if size < 128 || first_lba == 0 {
        return false;
    }
    let Ok(start) = usize::try_from(first_lba * 512) else {
        return false;
    };
    (0..count.min(128)).any(|i| {
        head.get(start + i * size..start + i * size + 16)
            .is_some_and(|kind| kind == ESP_TYPE)
    })
}

impl ImageStore {
    /// Imports `file` as image `name`: a qcow2 or raw disk that boots by
    /// itself. On any error nothing of `name` is left.
    pub fn import(
        &self,
        name: &str,
        file: &Path,
        firmware: FirmwareChoice,
        default_user: Option<String>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<crate::Image, ImageError> {
        let invalid = |message: String| ImageError::Import {
            file: file.to_owned(),
            message,
        };
        if IMAGES.contains(&name) {
            return Err(ImageError::BadName {
                name: name.to_owned(),
                why: "Quetzal builds an image of that name",
            });
        }
        if !valid_name(name) {
            return Err(ImageError::BadName {
                name: name.to_owned(),
                why: "use 1-63 of a-z, 0-9 and '-', starting with a letter or digit",
            });
        }
        apt::require_tools(&["qemu-img"])?;
        std::fs::File::open(file)
            .and_then(|f| f.metadata())
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
            .map_err(|err| invalid(format!("cannot read it: {err}")))?;
        let image_dir = self.root.join(name);
        if image_dir.exists() {
            return Err(ImageError::Exists {
                name: name.to_owned(),
            });
        }
        std::fs::create_dir_all(&image_dir).map_err(|err| ImageError::io(&image_dir, err))?;
        let imported = (|| {
            let _lock = lock(&image_dir)?;
            let info = qemu_img_info(file).map_err(invalid)?;
            let firmware = match firmware {
                FirmwareChoice::Given(firmware) => firmware,
                FirmwareChoice::Detect => {
                    detect_firmware(&read_head(file, &info.format)?).map_err(invalid)?
                }
            };
            if firmware == Firmware::Uefi {
                for path in OVMF_FILES {
                    if !Path::new(path).is_file() {
                        return Err(invalid(format!(
                            "it boots with UEFI, and the UEFI firmware is not installed (no {path}: install the ovmf package)"
                        )));
                    }
                }
            }
            progress(&format!("hashing {}", file.display()));
            let (sha256, _) = sha256_file(file)?;
            let id = format!("import-{}", &sha256[..16]);
            progress(&format!(
                "storing it as qcow2 ({} MiB virtual, {} firmware)",
                info.virtual_size >> 20,
                firmware.as_str()
            ));
            self.install(name, &id, |work| {
                let out = work.join("out");
                std::fs::create_dir_all(&out).map_err(|err| ImageError::io(&out, err))?;
                let disk = out.join("root.qcow2");
                apt::run(
                    Command::new("qemu-img")
                        .args(["convert", "-q", "-f", &info.format, "-O", "qcow2"])
                        .arg(file)
                        .arg(&disk),
                )?;
                set_read_only(&disk)?;
                Ok(Manifest {
                    name: name.to_owned(),
                    id: id.clone(),
                    recipe: 0,
                    built_at_unix: now_unix(),
                    packages: Vec::new(),
                    kernel: None,
                    initrd: None,
                    root_disk: record(&out, "root.qcow2")?,
                    root_disk_format: "qcow2".to_owned(),
                    append: String::new(),
                    modules: Vec::new(),
                    boot: BootFrom::Disk,
                    firmware,
                    cloud_init: Some(CloudInit {
                        default_user: default_user.clone(),
                    }),
                    imported_from: Some(format!("{} (sha256 {sha256})", file.display())),
                })
            })?;
            self.get(name)
        })();
        if imported.is_err() {
            let _ = std::fs::remove_dir_all(&image_dir);
        }
        imported
    }

    /// Deletes image `name`, every build of it. The caller makes sure no VM
    /// or template uses it (the node, which knows them, does).
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        self.check_known(name)?;
        let image_dir = self.root.join(name);
        let _lock = lock(&image_dir)?;
        remove_dir_if_exists(&image_dir)
    }
}

/// The UEFI firmware a VM of a `uefi` image boots (Debian's `ovmf`; the
/// engine's `spec::OVMF_CODE` and `OVMF_VARS` load it).
const OVMF_FILES: [&str; 2] = [
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
];

fn qemu_img_info(file: &Path) -> Result<Info, String> {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(file)
        .output()
        .map_err(|err| format!("cannot run qemu-img: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img cannot open it: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let info: Info = serde_json::from_slice(&output.stdout)
        .map_err(|err| format!("qemu-img info gave no answer we read: {err}"))?;
    if info.format != "qcow2" && info.format != "raw" {
        return Err(format!(
            "it is a {} image; import qcow2 or raw (qemu-img convert -O qcow2 makes one)",
            info.format
        ));
    }
    if let Some(backing) = &info.backing_filename {
        return Err(format!(
            "it is an overlay on {backing}; import a standalone disk (qemu-img convert makes one)"
        ));
    }
    if info.format == "qcow2" {
        let check = Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(file)
            .output()
            .map_err(|err| format!("cannot run qemu-img: {err}"))?;
        if !check.status.success() {
            return Err(format!(
                "qemu-img check finds it damaged: {}",
                String::from_utf8_lossy(&check.stdout).trim()
            ));
        }
    }
    Ok(info)
}

/// The first MiB of the disk inside `file` (through `qemu-img dd` for
/// qcow2, whose file does not start with the disk).
fn read_head(file: &Path, format: &str) -> Result<Vec<u8>, ImageError> {
    const HEAD: usize = 1 << 20;
    if format == "raw" {
        let mut head = Vec::with_capacity(HEAD);
        std::fs::File::open(file)
            .and_then(|f| f.take(HEAD as u64).read_to_end(&mut head))
            .map_err(|err| ImageError::io(file, err))?;
        return Ok(head);
    }
    let scratch = tempfile_path(file);
    let result = apt::run(
        Command::new("qemu-img")
            .args(["dd", "-f", format, "-O", "raw", "bs=512", "count=2048"])
            .arg(format!("if={}", file.display()))
            .arg(format!("of={}", scratch.display())),
    )
    .and_then(|_| std::fs::read(&scratch).map_err(|err| ImageError::io(&scratch, err)));
    let _ = std::fs::remove_file(&scratch);
    result
}

fn tempfile_path(file: &Path) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "quetzal-import-{}-{}",
        std::process::id(),
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
}

fn set_read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|err| ImageError::io(path, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(code: bool, types: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 1 << 20];
        if code {
            head[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        }
        for (i, kind) in types.iter().enumerate() {
            head[446 + 16 * i + 4] = *kind;
        }
        head[510] = 0x55;
        head[511] = 0xaa;
        head
    }

    fn gpt(head: &mut [u8], types: &[[u8; 16]]) {
        let header = &mut head[512..512 + 92];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        for (i, kind) in types.iter().enumerate() {
            head[1024 + 128 * i..1024 + 128 * i + 16].copy_from_slice(kind);
        }
    }

    #[test]
    fn a_disk_with_bios_boot_code_boots_with_bios() {
        // Like Debian's cloud images: GPT with both a BIOS boot partition
        // and an ESP, and GRUB's code in the protective MBR.
        let mut head = mbr(true, &[0xee]);
        gpt(&mut head, &[[0x11; 16], ESP_TYPE]);

        assert_eq!(detect_firmware(&head), Ok(Firmware::Bios));
        assert_eq!(detect_firmware(&mbr(true, &[0x83])), Ok(Firmware::Bios));
    }

    #[test]
    fn a_gpt_disk_with_only_an_esp_boots_with_uefi() {
        let mut head = mbr(false, &[0xee]);
        gpt(&mut head, &[[0x11; 16], ESP_TYPE]);

        assert_eq!(detect_firmware(&head), Ok(Firmware::Uefi));
    }

    #[test]
    fn a_file_without_a_boot_sector_or_bootloader_is_refused() {
        let text = b"hello, this is not a disk".repeat(100);
        let mut no_esp = mbr(false, &[0xee]);
        gpt(&mut no_esp, &[[0x11; 16]]);

        assert!(
            detect_firmware(&text)
                .unwrap_err()
                .contains("not a bootable disk")
        );
        assert!(
            detect_firmware(&no_esp)
                .unwrap_err()
                .contains("no bootloader")
        );
        assert!(
            detect_firmware(&mbr(false, &[0x83]))
                .unwrap_err()
                .contains("no bootloader")
        );
    }
}
