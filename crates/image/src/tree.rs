//! A file tree described in memory, written either as a `newc` cpio archive
//! (an initramfs) or into a directory (the staging of an ext4 root disk).
//! One description serves both, so the initramfs and the root disk cannot
//! drift apart.

use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use crate::ImageError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        target: String,
    },
    /// A character device (only in the cpio: the kernel needs /dev/console
    /// before devtmpfs is mounted).
    CharDevice {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Paths are relative, without a leading `/` (`bin/sh`), in creation order:
/// a directory before what it holds.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub entries: Vec<(String, Node)>,
}

impl Tree {
    pub fn dir(&mut self, path: &str) {
        self.entries
            .push((path.to_owned(), Node::Dir { mode: 0o755 }));
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.entries.push((
            path.to_owned(),
            Node::File {
                mode,
                data: data.into(),
            },
        ));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entries.push((
            path.to_owned(),
            Node::Symlink {
                target: target.to_owned(),
            },
        ));
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entries.push((
            path.to_owned(),
            Node::CharDevice {
                mode: 0o600,
                major,
                minor,
            },
        ));
    }

    /// Writes the tree as a `newc` cpio archive, all files owned by root,
    /// timestamps zero (the same tree gives the same bytes).
    pub fn write_cpio(&self, out: &mut impl Write) -> std::io::Result<()> {
        for (inode, (path, node)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (0o040_000 | mode, &[], (0, 0)),
                Node::File { mode, data } => (0o100_000 | mode, data, (0, 0)),
                Node::Symlink { target } => (0o120_777, target.as_bytes(), (0, 0)),
                Node::CharDevice { mode, major, minor } => {
                    (0o020_000 | mode, &[], (*major, *minor))
                }
            };
            write_cpio_entry(out, inode, mode, path, data, rdev)?;
        }
        write_cpio_entry(out, 0, 0, "TRAILER!!!", &[], (0, 0))
    }

    /// Creates the tree under `root` (which must exist). Device nodes are
    /// skipped: a booted system gets them from devtmpfs.
    pub fn write_into(&self, root: &Path) -> Result<(), ImageError> {
        for (path, node) in &self.entries {
            let target = root.join(path);
            let io = |source| ImageError::io(&target, source);
            match node {
                Node::Dir { mode } => {
                    std::fs::create_dir_all(&target).map_err(io)?;
                    set_mode(&target, *mode).map_err(io)?;
                }
                Node::File { mode, data } => {
                    std::fs::write(&target, data).map_err(io)?;
                    set_mode(&target, *mode).map_err(io)?;
                }
                Node::Symlink { target: link } => symlink(link, &target).map_err(io)?,
                Node::CharDevice { .. } => {}
            }
        }
        Ok(())
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn write_cpio_entry(
    out: &mut impl Write,
    inode: u32,
    mode: u32,
    name: &str,
    data: &[u8],
    (rdev_major, rdev_minor): (u32, u32),
) -> std::io::Result<()> {
    let name_size = name.len() + 1;
    let too_big = |_| std::io::Error::other(format!("{name} is too large for cpio"));
    let file_size = u32::try_from(data.len()).map_err(too_big)?;
    let name_size_field = u32::try_from(name_size).map_err(too_big)?;
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        inode,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        file_size,
        0, // dev major
        0, // dev minor
        rdev_major,
        rdev_minor,
        name_size_field,
        0, // check
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..padding(header.len() + name_size)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..padding(data.len())])
}

/// Bytes to the next multiple of 4.
fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_padded_to_four_bytes() {
        let mut tree = Tree::default();
        tree.file("init", 0o755, "#!/bin/sh\n");
        let mut out = Vec::new();

        tree.write_cpio(&mut out).unwrap();

        assert!(out.starts_with(b"070701"));
        // 110-byte header + "init\0" = 115, padded to 116; data 10 padded to 12.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..126], b"#!/bin/sh\n");
        assert_eq!(&out[128..134], b"070701");
        assert!(out.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn records_mode_size_and_device_numbers_in_hex() {
        let mut tree = Tree::default();
        tree.char_device("dev/console", 5, 1);
        let mut out = Vec::new();

        tree.write_cpio(&mut out).unwrap();
        let field = |n: usize| std::str::from_utf8(&out[6 + 8 * n..14 + 8 * n]).unwrap();

        assert_eq!(field(1), "00002180"); // S_IFCHR | 0600
        assert_eq!(field(9), "00000005");
        assert_eq!(field(10), "00000001");
    }

    #[test]
    fn writes_the_same_tree_into_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::default();
        tree.dir("bin");
        tree.file("bin/busybox", 0o755, "elf");
        tree.symlink("bin/sh", "busybox");
        tree.char_device("dev-console", 5, 1);

        tree.write_into(dir.path()).unwrap();

        let mode = std::fs::metadata(dir.path().join("bin/busybox"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(!dir.path().join("dev-console").exists());
    }
}
