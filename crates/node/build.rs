//! Embeds the dashboard (`web/dist`, built by `npm run build` in `web/`)
//! into quetzald. Without a build the daemon serves a page saying so.

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dist = manifest.join("../../web/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut files = Vec::new();
    if dist.is_dir() {
        collect(&dist, &mut files);
    }
    files.sort();
    let mut out = String::from(
        "/// The dashboard's files: (URL path, contents).\npub static ASSETS: &[(&str, &[u8])] = &[\n",
    );
    for file in &files {
        let url = file
            .strip_prefix(&dist)
            .expect("under dist")
            .to_string_lossy()
            .replace('\\', "/");
        let absolute = file.canonicalize().expect("a file we just listed");
        let _ = writeln!(
            out,
            "    (\"/{url}\", include_bytes!({:?})),",
            absolute.display().to_string()
        );
    }
    out.push_str("];\n");
    let target =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("assets.rs");
    std::fs::write(target, out).expect("OUT_DIR is writable");
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("web/dist is readable");
    for entry in entries.flatten() {
        let path = entry.path();
        // Dot files are the build's own notes (setup's source stamp).
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}
