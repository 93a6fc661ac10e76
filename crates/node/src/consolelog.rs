//! Keeps a VM's console log bounded. The engine appends everything the
//! guest prints to it (opened for appending, so it survives daemon
//! restarts); a guest that prints without end must not fill the host's
//! disk. Past [`MAX_BYTES`] the log loses its beginning and keeps its last
//! [`KEEP_BYTES`] or so: enough for a new viewer's history.
//!
//! The beginning is cut out in place (`fallocate` with
//! `FALLOC_FL_COLLAPSE_RANGE`, which ext4 and XFS have): the engine's
//! appends carry on at the new end and no byte written meanwhile is lost.
//! Where the filesystem cannot do that, the tail is copied to the start
//! and the file truncated after it — output written during that copy
//! (microseconds) can be lost from the log, never from live viewers.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The size past which a console log is cut.
pub const MAX_BYTES: u64 = 1 << 20;
/// About how much of its end a cut log keeps.
pub const KEEP_BYTES: u64 = 256 << 10;
/// How much console output passes between two looks at the log's size.
pub const CHECK_EVERY: usize = 64 << 10;

/// Cuts the log at `path` down to about its last `keep` bytes when it is
/// longer than `max`; whether it cut.
pub fn trim(path: &Path, max: u64, keep: u64) -> std::io::Result<bool> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let size = file.metadata()?.len();
    if size <= max {
        return Ok(false);
    }
    if collapse(&file, size, keep).is_err() {
        copy_tail(&mut file, size, keep)?;
    }
    Ok(true)
}

/// Cuts the beginning out in place, in whole filesystem blocks.
fn collapse(file: &std::fs::File, size: u64, keep: u64) -> nix::Result<()> {
    let block = 4096;
    let cut = (size - keep) / block * block;
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
        0,
        i64::try_from(cut).unwrap_or(i64::MAX),
    )
}

/// Moves the last `keep` bytes to the start and ends the file there.
fn copy_tail(file: &mut std::fs::File, size: u64, keep: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(size - keep))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&tail)?;
    file.set_len(u64::try_from(tail.len()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.

    use super::*;

    /// `len` bytes, each telling its offset (so a kept tail can be checked).
    fn numbered(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    /// Cuts a 300 KiB log with `cut`, then checks what a user would: the
    /// log ends as it did, is about 32 KiB, and an appending writer (the
    /// engine) carries on at its new end.
    fn check_cut(cut: impl FnOnce(&mut std::fs::File, u64, u64)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let written = numbered(300 << 10);
        std::fs::write(&path, &written).unwrap();
        let mut appender = OpenOptions::new().append(true).open(&path).unwrap();

        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        cut(&mut file, 300 << 10, 32 << 10);

        let kept = std::fs::read(&path).unwrap();
        assert!(
            kept.len() >= 32 << 10 && kept.len() < (32 << 10) + 4096,
            "{}",
            kept.len()
        );
        assert!(written.ends_with(&kept), "the log keeps its end");
        appender.write_all(b"more").unwrap();
        let now = std::fs::read(&path).unwrap();
        assert_eq!(now.len(), kept.len() + 4);
        assert!(now.ends_with(b"more"));
    }

    #[test]
    fn collapsing_keeps_the_end_and_appends_carry_on() {
        // The tests' temp dirs are on ext4 here, which can collapse.
        check_cut(|file, size, keep| collapse(file, size, keep).unwrap());
    }

    #[test]
    fn copying_the_tail_keeps_the_end_and_appends_carry_on() {
        check_cut(|file, size, keep| copy_tail(file, size, keep).unwrap());
    }

    #[test]
    fn a_long_log_is_cut_and_then_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, numbered(300 << 10)).unwrap();

        assert!(trim(&path, 128 << 10, 32 << 10).unwrap());
        assert!(!trim(&path, 128 << 10, 32 << 10).unwrap());
    }

    #[test]
    fn a_short_log_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"tiny: up\n").unwrap();

        assert!(!trim(&path, 128 << 10, 32 << 10).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"tiny: up\n");
    }
}
