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
pub mod kmod;
pub mod tiny;
pub mod tree;

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

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
pub const IMAGES: &[&str] = &["tiny"];
/// The image used when none is named.
pub const DEFAULT_IMAGE: &str = "tiny";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image '{name}' (known: {})", IMAGES.join(", "))]
    Unknown { name: String },
    #[error("image '{name}' is not built yet; run: quetzal image build {name}")]
    NotBuilt { name: String },
    #[error("{tool} is not installed (install the {package} package)")]
    MissingTool { tool: String, package: &'static str },
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub id: String,
    pub recipe: u32,
    pub built_at_unix: u64,
    pub packages: Vec<PackageRecord>,
    pub kernel: FileRecord,
    pub initrd: FileRecord,
    pub root_disk: FileRecord,
    pub root_disk_format: String,
    pub append: String,
    pub modules: Vec<String>,
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

    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.path)
    }

    pub fn initrd(&self) -> PathBuf {
        self.dir.join(&self.manifest.initrd.path)
    }

    /// The base disk: read-only, VMs get qcow2 overlays on it.
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.root_disk.path)
    }

    /// Whether every file still has the size and sha256 the manifest says.
    pub fn verify(&self) -> Result<bool, ImageError> {
        for record in [
            &self.manifest.kernel,
            &self.manifest.initrd,
            &self.manifest.root_disk,
        ] {
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

    fn check_known(name: &str) -> Result<(), ImageError> {
        if IMAGES.contains(&name) {
            Ok(())
        } else {
            Err(ImageError::Unknown {
                name: name.to_owned(),
            })
        }
    }

    /// The current build of `name`.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        Self::check_known(name)?;
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
        Self::check_known(name)?;
        apt::require_tools(&["apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "qemu-img"])?;
        let image_dir = self.root.join(name);
        std::fs::create_dir_all(&image_dir).map_err(|err| ImageError::io(&image_dir, err))?;
        let lock_path = image_dir.join(".lock");
        let lock_file = File::create(&lock_path).map_err(|err| ImageError::io(&lock_path, err))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| ImageError::io(&lock_path, errno.into()))?;

        let kernel_meta = apt::show(tiny::KERNEL_PACKAGE)?;
        let kernel_name = kernel_meta
            .depends
            .iter()
            .find(|dep| dep.starts_with("linux-image-"))
            .ok_or_else(|| ImageError::PackageUnknown {
                package: tiny::KERNEL_PACKAGE.to_owned(),
                message: "it depends on no linux-image package".to_owned(),
            })?;
        let kernel = apt::show(kernel_name)?;
        let busybox = apt::show(tiny::BUSYBOX_PACKAGE)?;
        let (_, agent) = agent::load()?;
        let agent_sha = sha256_bytes(&agent);
        let id = build_id(&kernel, &busybox, &agent_sha);

        if let Ok(current) = self.get(name)
            && current.manifest.id == id
            && current.verify()?
        {
            progress(&format!("image {name} is up to date ({id})"));
            return Ok(BuildOutcome::UpToDate);
        }

        let build_dir = image_dir.join(&id);
        let work = image_dir.join(format!(".{id}.work"));
        for stale in [&build_dir, &work] {
            remove_dir_if_exists(stale)?;
        }
        std::fs::create_dir_all(&work).map_err(|err| ImageError::io(&work, err))?;
        let manifest = build_tiny(
            name,
            &id,
            &kernel,
            &busybox,
            (agent, agent_sha),
            &work,
            progress,
        );
        let manifest = match manifest {
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
        std::os::unix::fs::symlink(&id, &link).map_err(|err| ImageError::io(&link, err))?;
        let current = image_dir.join("current");
        std::fs::rename(&link, &current).map_err(|err| ImageError::io(&current, err))?;
        progress(&format!("image {name} built ({id})"));
        Ok(BuildOutcome::Built)
    }
}

fn build_id(kernel: &apt::Package, busybox: &apt::Package, agent_sha: &str) -> String {
    let raw = format!(
        "{}-{}-busybox-{}-agent-{}-r{}",
        kernel.name.trim_start_matches("linux-image-"),
        kernel.version,
        busybox.version,
        agent_sha.get(..12).unwrap_or(agent_sha),
        tiny::RECIPE
    );
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), ImageError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(ImageError::io(dir, err)),
    }
}

fn build_tiny(
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
    let order = index.load_order(tiny::MODULES)?;
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
    let userland = tiny::userland(busybox_bytes, &applets, agent);
    packages.push(PackageRecord {
        name: "quetzal-agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sha256: agent_sha,
    });

    let initrd_path = out.join("initrd.img");
    let initrd_file =
        File::create(&initrd_path).map_err(|err| ImageError::io(&initrd_path, err))?;
    let mut writer = BufWriter::new(initrd_file);
    tiny::initramfs(userland.clone(), modules)
        .write_cpio(&mut writer)
        .and_then(|()| writer.into_inner().map_err(|err| err.into_error()))
        .and_then(|file| file.sync_all())
        .map_err(|err| ImageError::io(&initrd_path, err))?;

    progress(&format!(
        "building the {} MiB root disk",
        tiny::ROOT_DISK_MIB
    ));
    let staging = work.join("rootfs");
    std::fs::create_dir_all(&staging).map_err(|err| ImageError::io(&staging, err))?;
    userland.write_into(&staging)?;
    let raw = work.join("root.raw");
    apt::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "tiny-root", "-E", "root_owner=0:0", "-d"])
            .arg(&staging)
            .arg(&raw)
            .arg(format!("{}M", tiny::ROOT_DISK_MIB)),
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
        recipe: tiny::RECIPE,
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        packages,
        kernel: record(&out, "vmlinuz")?,
        initrd: record(&out, "initrd.img")?,
        root_disk: record(&out, "root.qcow2")?,
        root_disk_format: "qcow2".to_owned(),
        append: tiny::APPEND.to_owned(),
        modules: order.into_iter().map(|(name, _)| name).collect(),
    })
}

/// The only entry of `dir` whose name starts with `prefix`.
fn find_file(dir: &Path, prefix: &str, package: &str) -> Result<PathBuf, ImageError> {
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

fn record(dir: &Path, name: &str) -> Result<FileRecord, ImageError> {
    let (sha256, bytes) = sha256_file(&dir.join(name))?;
    Ok(FileRecord {
        path: name.to_owned(),
        sha256,
        bytes,
    })
}

fn mib(bytes: u64) -> f64 {
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

    #[test]
    fn names_builds_after_their_package_versions_and_recipe() {
        let package = |name: &str, version: &str| apt::Package {
            name: name.into(),
            version: version.into(),
            size: 0,
            depends: vec![],
        };

        let id = build_id(
            &package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
            &package("busybox-static", "1:1.35.0-4+b3"),
            "0123456789abcdef",
        );

        assert_eq!(
            id,
            format!(
                "6.1.0-56-cloud-amd64-6.1.192-2-busybox-1_1.35.0-4_b3-agent-0123456789ab-r{}",
                tiny::RECIPE
            )
        );
    }
}
