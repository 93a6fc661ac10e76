//! Guest images, built from Debian packages and cached under
//! `DATA_DIR/images/NAME/`.
//!
//! Each build goes to its own directory `NAME/<id>/`, named for the package
//! versions and recipe it was made from; `NAME/current` is a symlink to the
//! newest complete one, switched atomically once its manifest is written.
//! So a half-built image never looks complete, and a rebuild never changes
//! the base disk under a VM whose overlay points at an older build.

#![forbid(unsafe_code)]

pub mod agent;
pub mod apt;
pub mod debian;
pub mod import;
pub mod kmod;
pub mod tiny;
pub mod tree;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where Quetzal keeps images and VMs: `$QUETZAL_DATA_DIR`, else
/// `/var/lib/quetzal` for root, else `~/.local/share/quetzal`.
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QUETZAL_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/quetzal");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/quetzal")
}

/// The images Quetzal knows how to build.
pub const IMAGES: &[&str] = &["tiny", "debian", "desktop"];
/// The image used when none is named.
pub const DEFAULT_IMAGE: &str = "tiny";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "unknown image '{name}' (Quetzal builds {}; others come from: quetzal image import NAME FILE)",
        IMAGES.join(", ")
    )]
    Unknown { name: String },
    #[error("image '{name}' is not built yet; run: quetzal image build {name}")]
    NotBuilt { name: String },
    #[error("{tool} is not installed (install the {package} package)")]
    MissingTool { tool: String, package: String },
    #[error("{tool} failed: {message}")]
    Tool { tool: String, message: String },
    #[error("apt does not know package {package}: {message}")]
    PackageUnknown { package: String, message: String },
    #[error("cannot download {package}: {message}")]
    Download { package: String, message: String },
    #[error("kernel module {0} is not in the kernel package")]
    MissingModule(String),
    #[error("{what} not found in {package}")]
    MissingFile { what: String, package: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot import {}: {message}", file.display())]
    Import { file: PathBuf, message: String },
    #[error("image name '{name}' is not allowed: {why}")]
    BadName { name: String, why: &'static str },
    #[error("image {name} exists already (quetzal image rm {name} removes it)")]
    Exists { name: String },
    #[error("manifest {path} is unreadable: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "quetzal-agent is not built (looked at {looked}); run scripts/build-agent (scripts/setup does), or set QUETZAL_AGENT"
    )]
    AgentMissing { looked: String },
    #[error(
        "{path} is not statically linked: the guest has no libc for it; build it with scripts/build-agent"
    )]
    AgentNotStatic { path: PathBuf },
}

impl ImageError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One file of an image, as recorded in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the image's directory.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A Debian package an image was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub name: String,
    pub version: String,
    /// Of the downloaded `.deb`.
    pub sha256: String,
}

/// What an image is made of; written last, so its presence means complete.
/// Fields added after the first release default, so older builds still
/// read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub id: String,
    pub recipe: u32,
    pub built_at_unix: u64,
    pub packages: Vec<PackageRecord>,
    /// For a direct boot (`-kernel`); an imported disk has none.
    #[serde(default)]
    pub kernel: Option<FileRecord>,
    #[serde(default)]
    pub initrd: Option<FileRecord>,
    pub root_disk: FileRecord,
    pub root_disk_format: String,
    /// The kernel command line of a direct boot.
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub modules: Vec<String>,
    /// How its VMs boot.
    #[serde(default)]
    pub boot: BootFrom,
    /// The firmware its disk's bootloader needs.
    #[serde(default)]
    pub firmware: Firmware,
    /// Set when the guest runs cloud-init: its VMs get a NoCloud seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// The file an imported image was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
}

/// Where a VM's boot starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootFrom {
    /// QEMU loads the image's kernel and initrd.
    #[default]
    Kernel,
    /// The firmware runs the disk's own bootloader.
    Disk,
}

/// The firmware a disk's bootloader is written for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF, from Debian's `ovmf` package.
    Uefi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// What a cloud-init guest needs to know about its image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The user `--ssh-key` authorizes (cloud-init's default user), when
    /// the image says.
    pub default_user: Option<String>,
}

/// A complete, built image.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The build in `dir` (a directory with a `manifest.json`).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|err| ImageError::io(&path, err))?;
        let manifest = serde_json::from_str(&text).map_err(|err| ImageError::Manifest {
            path: path.clone(),
            message: err.to_string(),
        })?;
        Ok(Image {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// The kernel of a direct boot, if the image has one.
    pub fn kernel(&self) -> Option<PathBuf> {
        self.manifest
            .kernel
            .as_ref()
            .map(|k| self.dir.join(&k.path))
    }

    pub fn initrd(&self) -> Option<PathBuf> {
        self.manifest
            .initrd
            .as_ref()
            .map(|i| self.dir.join(&i.path))
    }

    /// The base disk: read-only, VMs get qcow2 overlays on it.
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.root_disk.path)
    }

    /// Whether every file still has the size and sha256 the manifest says.
    pub fn verify(&self) -> Result<bool, ImageError> {
        let records = [&self.manifest.kernel, &self.manifest.initrd]
            .into_iter()
            .flatten()
            .chain([&self.manifest.root_disk]);
        for record in records {
            let path = self.dir.join(&record.path);
            match sha256_file(&path) {
                Ok((sha256, bytes)) if sha256 == record.sha256 && bytes == record.bytes => {}
                Ok(_) => return Ok(false),
                Err(ImageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(false);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }
}

/// Whether `name` can name an imported image: 1–63 of `a-z`, `0-9`, `-`,
/// starting with a letter or digit (it becomes a directory name).
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// What `build` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    Built,
    UpToDate,
}

/// The image cache under `DATA_DIR/images`.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(data_dir: &Path) -> Self {
        ImageStore {
            root: data_dir.join("images"),
        }
    }

    fn check_buildable(name: &str) -> Result<(), ImageError> {
        if IMAGES.contains(&name) {
            Ok(())
        } else {
            Err(ImageError::Unknown {
                name: name.to_owned(),
            })
        }
    }

    /// A name `get` can answer for: one we build, or one imported.
    fn check_known(&self, name: &str) -> Result<(), ImageError> {
        if IMAGES.contains(&name) || (valid_name(name) && self.root.join(name).is_dir()) {
            Ok(())
        } else {
            Err(ImageError::Unknown {
                name: name.to_owned(),
            })
        }
    }

    /// Every image there is or could be built: the ones Quetzal builds,
    /// then the imported ones, by name.
    pub fn names(&self) -> Result<Vec<String>, ImageError> {
        let mut imported = Vec::new();
        match std::fs::read_dir(&self.root) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|err| ImageError::io(&self.root, err))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if valid_name(&name) && !IMAGES.contains(&name.as_str()) {
                        imported.push(name);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(ImageError::io(&self.root, err)),
        }
        imported.sort();
        Ok(IMAGES
            .iter()
            .map(|n| (*n).to_owned())
            .chain(imported)
            .collect())
    }

    /// The current build of `name`.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        self.check_known(name)?;
        let dir = self.root.join(name).join("current");
        let path = dir.join("manifest.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotBuilt {
                    name: name.to_owned(),
                });
            }
            Err(err) => return Err(ImageError::io(&path, err)),
        };
        let manifest = serde_json::from_str(&text).map_err(|err| ImageError::Manifest {
            path: path.clone(),
            message: err.to_string(),
        })?;
        // Resolve the symlink so VMs record the build they were made from.
        let dir = std::fs::canonicalize(&dir).map_err(|err| ImageError::io(&dir, err))?;
        Ok(Image { dir, manifest })
    }

    /// Builds `name` unless its current build is made of the packages apt
    /// offers now, by this recipe, and its files are intact. Progress lines
    /// go to `progress`. Concurrent builds wait for each other.
    pub fn build(
        &self,
        name: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<BuildOutcome, ImageError> {
        Self::check_buildable(name)?;
        let image_dir = self.root.join(name);
        std::fs::create_dir_all(&image_dir).map_err(|err| ImageError::io(&image_dir, err))?;
        let _lock = lock(&image_dir)?;

        let plan = match name {
            "debian" => debian::plan(&debian::DEBIAN)?,
            "desktop" => debian::plan(&debian::DESKTOP)?,
            _ => tiny::plan()?,
        };
        if let Ok(current) = self.get(name)
            && current.manifest.id == plan.id
            && current.verify()?
        {
            progress(&format!("image {name} is up to date ({})", plan.id));
            return Ok(BuildOutcome::UpToDate);
        }
        let id = plan.id.clone();
        self.install(name, &id, |work| (plan.make)(name, work, progress))?;
        progress(&format!("image {name} built ({id})"));
        Ok(BuildOutcome::Built)
    }

    /// Makes build `id` of `name` in a work directory by `make` (which
    /// leaves its files in `WORK/out` and returns their manifest), moves it
    /// into place and makes it current. Nothing is left of a failed build.
    /// Called with the image's lock held.
    fn install(
        &self,
        name: &str,
        id: &str,
        make: impl FnOnce(&Path) -> Result<Manifest, ImageError>,
    ) -> Result<(), ImageError> {
        let image_dir = self.root.join(name);
        let build_dir = image_dir.join(id);
        let work = image_dir.join(format!(".{id}.work"));
        for stale in [&build_dir, &work] {
            remove_dir_if_exists(stale)?;
        }
        std::fs::create_dir_all(&work).map_err(|err| ImageError::io(&work, err))?;
        let manifest = match make(&work) {
            Ok(manifest) => manifest,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(err);
            }
        };
        std::fs::rename(work.join("out"), &build_dir)
            .map_err(|err| ImageError::io(&build_dir, err))?;
        let _ = std::fs::remove_dir_all(&work);
        write_json(&build_dir.join("manifest.json"), &manifest)?;

        let link = image_dir.join(".current.new");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(id, &link).map_err(|err| ImageError::io(&link, err))?;
        let current = image_dir.join("current");
        std::fs::rename(&link, &current).map_err(|err| ImageError::io(&current, err))
    }
}

/// How to make one build of an image: its id, known before anything is
/// downloaded, and the work that makes it.
pub(crate) struct Plan {
    pub id: String,
    #[allow(clippy::type_complexity)]
    pub make: Box<dyn FnOnce(&str, &Path, &mut dyn FnMut(&str)) -> Result<Manifest, ImageError>>,
}

/// An exclusive lock on an image's directory, held while it changes.
fn lock(image_dir: &Path) -> Result<Flock<File>, ImageError> {
    let lock_path = image_dir.join(".lock");
    let lock_file = File::create(&lock_path).map_err(|err| ImageError::io(&lock_path, err))?;
    Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| ImageError::io(&lock_path, errno.into()))
}

/// An id made of `parts`, with every character a directory name and a
/// version string can both hold.
pub(crate) fn build_id(parts: &[&str]) -> String {
    parts
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn remove_dir_if_exists(dir: &Path) -> Result<(), ImageError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(ImageError::io(dir, err)),
    }
}

/// The only entry of `dir` whose name starts with `prefix`.
pub(crate) fn find_file(dir: &Path, prefix: &str, package: &str) -> Result<PathBuf, ImageError> {
    std::fs::read_dir(dir)
        .map_err(|err| ImageError::io(dir, err))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .ok_or_else(|| ImageError::MissingFile {
            what: format!("{}/{prefix}*", dir.display()),
            package: package.to_owned(),
        })
}

pub(crate) fn record(dir: &Path, name: &str) -> Result<FileRecord, ImageError> {
    let (sha256, bytes) = sha256_file(&dir.join(name))?;
    Ok(FileRecord {
        path: name.to_owned(),
        sha256,
        bytes,
    })
}

pub(crate) fn mib(bytes: u64) -> f64 {
    // Sizes here are far below 2^52: the conversion is exact enough.
    #[allow(clippy::cast_precision_loss)]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

/// The sha256 (hex) of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The sha256 (hex) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), ImageError> {
    let mut file = File::open(path).map_err(|err| ImageError::io(path, err))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let read = file
            .read(&mut buf)
            .map_err(|err| ImageError::io(path, err))?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        total += u64::try_from(read).expect("a read length fits in u64");
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, total))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ImageError> {
    let text = serde_json::to_string_pretty(value).expect("a manifest always serializes");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|err| ImageError::io(&tmp, err))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|err| ImageError::io(&tmp, err))?;
    std::fs::rename(&tmp, path).map_err(|err| ImageError::io(path, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_an_unknown_image_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path());

        let result = store.get("windows");

        assert!(matches!(result, Err(ImageError::Unknown { .. })));
    }

    #[test]
    fn says_an_image_is_not_built_until_its_manifest_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images/tiny/x")).unwrap();
        std::os::unix::fs::symlink("x", dir.path().join("images/tiny/current")).unwrap();
        let store = ImageStore::new(dir.path());

        let result = store.get("tiny");

        assert!(matches!(result, Err(ImageError::NotBuilt { .. })));
    }

    #[test]
    fn hashes_files_with_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();

        let (sha, bytes) = sha256_file(&path).unwrap();

        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(bytes, 3);
    }
}
