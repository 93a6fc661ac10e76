//! Which quetzald the CLI trusts over TCP: a server is known by the
//! SHA-256 fingerprint of its certificate, pinned by `--fingerprint`,
//! `QUETZAL_FINGERPRINT`, or on first use (asked at a terminal, then kept
//! in `~/.config/quetzal/servers`), as `incus remote add` does. Names and
//! CAs play no part: the node's certificate is its own.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

/// `--fingerprint`, when given.
static FLAG: OnceLock<String> = OnceLock::new();

/// Pins the server's fingerprint for this run (`--fingerprint`).
pub fn pin_for_this_run(fingerprint: String) {
    let _ = FLAG.set(fingerprint);
}

/// A fingerprint as we compare and print it: 64 lowercase hex digits.
/// Colons and case, as other tools print them, are accepted.
pub fn normalize(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

fn config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QUETZAL_CONFIG_DIR") {
        return Some(dir.into());
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("quetzal"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/quetzal"))
}

fn servers_file() -> Option<PathBuf> {
    config_dir().map(|dir| dir.join("servers"))
}

/// What the user pinned for `authority`, if anything: the flag, then the
/// environment, then the servers file.
pub fn pinned(authority: &str) -> Result<Option<String>, String> {
    let given = FLAG.get().cloned().or_else(|| {
        std::env::var("QUETZAL_FINGERPRINT")
            .ok()
            .filter(|v| !v.is_empty())
    });
    if let Some(text) = given {
        return normalize(&text).map(Some).ok_or_else(|| {
            format!("'{text}' is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        });
    }
    let Some(file) = servers_file() else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(None);
    };
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(server, _)| *server == authority)
        .and_then(|(_, fingerprint)| normalize(fingerprint)))
}

/// Remembers `fingerprint` for `authority` in the servers file.
fn remember(authority: &str, fingerprint: &str) -> Result<PathBuf, String> {
    let file = servers_file().ok_or("no home directory to keep trusted servers in")?;
    let mut kept: Vec<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.split_once(' ').is_none_or(|(s, _)| s != authority))
        .map(str::to_owned)
        .collect();
    kept.push(format!("{authority} {fingerprint}"));
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&file, kept.join("\n") + "\n")
    };
    write().map_err(|err| format!("cannot write {}: {err}", file.display()))?;
    Ok(file)
}

/// Asks at the terminal whether to trust a server seen for the first
/// time; `None` when there is no terminal to ask at.
pub fn ask_first_use(authority: &str, fingerprint: &str) -> Option<Result<bool, String>> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    eprintln!("quetzal: quetzald at {authority} is not known yet.");
    eprintln!("quetzal: its certificate's SHA-256 fingerprint is {fingerprint}");
    eprintln!("quetzal: (`quetzal token` on that node prints the fingerprint to compare)");
    eprint!("quetzal: trust it from now on? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return Some(Ok(false));
    }
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        return Some(Ok(false));
    }
    Some(remember(authority, fingerprint).map(|file| {
        eprintln!("quetzal: kept in {}", file.display());
        true
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_compared_without_colons_or_case() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");

        assert_eq!(normalize(&colons), Some(plain.clone()));
        assert_eq!(normalize(&plain), Some(plain));
        assert_eq!(normalize("abc"), None);
        assert_eq!(normalize(&"zz".repeat(32)), None);
    }
}
