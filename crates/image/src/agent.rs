//! The guest agent the images ship: `quetzal-agent`, statically linked
//! (`scripts/build-agent`), so one binary runs in `tiny`'s busybox and in
//! Debian.

use std::path::{Path, PathBuf};

use crate::ImageError;

/// Where `scripts/build-agent` leaves it, under a cargo target directory.
pub const BUILT: &str = "x86_64-unknown-linux-gnu/release/quetzal-agent";

/// `$QUETZAL_AGENT`, else the static build in the target directory this
/// program was built in (found from its own path), else `quetzal-agent`
/// beside it.
pub fn find() -> Result<PathBuf, ImageError> {
    if let Some(path) = std::env::var_os("QUETZAL_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let exe =
        std::env::current_exe().map_err(|err| ImageError::io(Path::new("/proc/self/exe"), err))?;
    let mut looked = Vec::new();
    for dir in exe.ancestors().skip(1).take(4) {
        let candidate = dir.join(BUILT);
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(candidate);
    }
    let beside = exe.with_file_name("quetzal-agent");
    if beside.is_file() {
        return Ok(beside);
    }
    Err(ImageError::AgentMissing {
        looked: looked
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    })
}

/// Whether `elf` is a 64-bit executable that needs no dynamic loader (no
/// `PT_INTERP` program header).
pub fn is_static(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(count)).all(|i| {
        let at = phoff + i * usize::from(size);
        elf.get(at..at + 4)
            .is_some_and(|kind| u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]) != 3)
    })
}

/// The agent's bytes, checked to be static.
pub fn load() -> Result<(PathBuf, Vec<u8>), ImageError> {
    let path = find()?;
    let bytes = std::fs::read(&path).map_err(|err| ImageError::io(&path, err))?;
    if !is_static(&bytes) {
        return Err(ImageError::AgentNotStatic { path });
    }
    Ok((path, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_static_executable_from_a_dynamic_one() {
        // This test program is linked dynamically (it needs ld.so).
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&own));
        assert!(!is_static(b"#!/bin/sh\n"));
        // A minimal ELF64 header with no program headers needs no loader.
        let mut header = vec![0u8; 64];
        header[..5].copy_from_slice(b"\x7fELF\x02");
        header[0x20] = 64;
        header[0x36] = 56;
        assert!(is_static(&header));
    }
}
