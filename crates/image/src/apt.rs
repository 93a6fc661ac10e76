//! Debian packages through apt: which version is current, download (apt
//! verifies the signature chain), extract.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ImageError;

/// A package as `apt-cache show` describes its candidate version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub size: u64,
    pub depends: Vec<String>,
}

/// Runs a tool and returns its stdout, or an error naming the tool and
/// quoting its stderr.
pub fn run(command: &mut Command) -> Result<String, ImageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingTool {
                tool: program.clone(),
                package: package_of(&program).to_owned(),
            }
        } else {
            ImageError::Tool {
                tool: program.clone(),
                message: source.to_string(),
            }
        }
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .filter(|line| !line.contains("unsandboxed"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(ImageError::Tool {
            tool: program,
            message: if message.is_empty() {
                output.status.to_string()
            } else {
                message
            },
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The Debian package that provides a tool we run.
pub fn package_of(tool: &str) -> &str {
    match tool {
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" => "dpkg",
        "mkfs.ext4" => "e2fsprogs",
        "qemu-img" => "qemu-utils",
        "mmdebstrap" => "mmdebstrap",
        "grub-mkimage" => "grub-common",
        "chroot" => "coreutils",
        "genisoimage" => "genisoimage",
        // The rest are packaged under their own name.
        other => other,
    }
}

/// Fails unless every tool is on PATH, naming the first missing one and
/// the package to install.
pub fn require_tools(tools: &[&str]) -> Result<(), ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        if !found {
            return Err(ImageError::MissingTool {
                tool: (*tool).to_owned(),
                package: package_of(tool).to_owned(),
            });
        }
    }
    Ok(())
}

/// The candidate version of `name` from apt's package lists.
pub fn show(name: &str) -> Result<Package, ImageError> {
    let text = run(Command::new("apt-cache").args(["show", "--no-all-versions", name])).map_err(
        |err| match err {
            ImageError::Tool { message, .. } => ImageError::PackageUnknown {
                package: name.to_owned(),
                message,
            },
            other => other,
        },
    )?;
    parse_show(name, &text)
}

/// Parses the first stanza of `apt-cache show`.
pub fn parse_show(name: &str, text: &str) -> Result<Package, ImageError> {
    let field = |key: &str| {
        text.lines()
            .take_while(|line| !line.is_empty())
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(": "))
            .map(str::trim)
    };
    let missing = || ImageError::PackageUnknown {
        package: name.to_owned(),
        message: "apt-cache gave no Version (run apt-get update)".to_owned(),
    };
    let version = field("Version").ok_or_else(missing)?.to_owned();
    let size = field("Size").and_then(|s| s.parse().ok()).unwrap_or(0);
    let depends = field("Depends")
        .map(|deps| {
            deps.split(',')
                .filter_map(|dep| dep.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Package {
        name: name.to_owned(),
        version,
        size,
        depends,
    })
}

/// Downloads the candidate `.deb` of `package` into `dir` and returns its
/// path. apt checks it against the signed package lists.
pub fn download(package: &Package, dir: &Path) -> Result<PathBuf, ImageError> {
    let mut command = Command::new("apt-get");
    command
        .current_dir(dir)
        .args(["download", "-q"])
        .arg(format!("{}={}", package.name, package.version));
    if nix::unistd::geteuid().is_root() {
        // Root downloads into a directory the _apt user cannot write to.
        command.args(["-o", "APT::Sandbox::User=root"]);
    }
    run(&mut command).map_err(|err| ImageError::Download {
        package: package.name.clone(),
        message: err.to_string(),
    })?;
    let prefix = format!("{}_", package.name);
    std::fs::read_dir(dir)
        .map_err(|source| ImageError::io(dir, source))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| ImageError::Download {
            package: package.name.clone(),
            message: "apt-get reported success but left no .deb".to_owned(),
        })
}

/// Unpacks a `.deb`'s files into `dir`.
pub fn extract(deb: &Path, dir: &Path) -> Result<(), ImageError> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\nInstalled-Size: 13\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nSize: 1504\n\nPackage: other\nVersion: 1\n";

    #[test]
    fn parses_version_size_and_depends_of_the_first_stanza() {
        let package = parse_show("linux-image-cloud-amd64", META).unwrap();

        assert_eq!(package.version, "6.1.192-2");
        assert_eq!(package.size, 1504);
        assert_eq!(package.depends, vec!["linux-image-6.1.0-56-cloud-amd64"]);
    }

    #[test]
    fn reports_a_stanza_without_version() {
        let result = parse_show("nothing", "N: Unable to locate package nothing\n");

        assert!(matches!(result, Err(ImageError::PackageUnknown { .. })));
    }

    #[test]
    fn names_the_package_of_a_missing_tool() {
        let result = require_tools(&["definitely-not-a-tool-quetzal"]);

        assert!(matches!(result, Err(ImageError::MissingTool { .. })));
        assert_eq!(package_of("grub-mkimage"), "grub-common");
        assert_eq!(
            require_tools(&["mmdebstrap-not-here"])
                .unwrap_err()
                .to_string(),
            "mmdebstrap-not-here is not installed (install the mmdebstrap-not-here package)"
        );
    }
}
