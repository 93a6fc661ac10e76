//! The first admin token's secret: created on first start, kept in
//! `DATA/token` with mode 0600 for `quetzal up` and `quetzal token` on
//! this host (the store keeps only its hash, see `node::access`).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub fn path(data: &Path) -> PathBuf {
    data.join("token")
}

/// Reads the token, creating it first if there is none.
pub fn ensure(data: &Path) -> std::io::Result<String> {
    let path = path(data);
    match std::fs::read_to_string(&path) {
        Ok(token) => return Ok(token.trim().to_owned()),
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        Err(_) => {}
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_a_private_token_once() {
        let dir = tempfile::tempdir().unwrap();

        let first = ensure(dir.path()).unwrap();
        let second = ensure(dir.path()).unwrap();

        assert_eq!(first, second);
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
