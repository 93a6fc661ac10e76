//! Kernel modules: which `.ko` files a set of drivers needs, in load order.
//!
//! A Debian kernel package has no `modules.dep` (depmod writes it at install
//! time), so dependencies are read from each module's `.modinfo` section:
//! the NUL-separated `depends=a,b` string.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::ImageError;

/// Modules by name (`virtio_pci`), with their file and dependencies.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    modules: BTreeMap<String, (PathBuf, Vec<String>)>,
}

/// `virtio-pci` and `virtio_pci` name the same module.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The `depends=` list of a module's bytes; empty when it has none.
pub fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = module
        .windows(KEY.len())
        .position(|window| window == KEY)
        .map(|at| at + KEY.len())
    else {
        return Vec::new();
    };
    let value = &module[start..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(normalize)
        .collect()
}

impl ModuleIndex {
    /// Indexes every `.ko` under `dir` (recursively).
    pub fn scan(dir: &Path) -> Result<Self, ImageError> {
        let mut index = ModuleIndex::default();
        let mut pending = vec![dir.to_owned()];
        while let Some(dir) = pending.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|source| ImageError::io(&dir, source))?;
            for entry in entries {
                let path = entry.map_err(|source| ImageError::io(&dir, source))?.path();
                if path.is_dir() {
                    pending.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".ko"))
                {
                    let bytes =
                        std::fs::read(&path).map_err(|source| ImageError::io(&path, source))?;
                    index.insert(name, path.clone(), depends(&bytes));
                }
            }
        }
        Ok(index)
    }

    pub fn insert(&mut self, name: &str, path: PathBuf, depends: Vec<String>) {
        self.modules.insert(normalize(name), (path, depends));
    }

    /// The modules `wanted` needs, dependencies first, each once.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, ImageError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(&normalize(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ImageError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let (path, depends) = self
            .modules
            .get(name)
            .ok_or_else(|| ImageError::MissingModule(name.to_owned()))?;
        for dependency in depends {
            self.visit(dependency, seen, order)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_from_modinfo_bytes() {
        let bytes = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0retpoline=Y\0";

        assert_eq!(depends(bytes), vec!["virtio", "virtio_ring"]);
    }

    #[test]
    fn reads_empty_depends_as_none() {
        let bytes = b"\0depends=\0intree=Y\0";

        assert!(depends(bytes).is_empty());
    }

    #[test]
    fn orders_dependencies_before_dependents_once_each() {
        let mut index = ModuleIndex::default();
        index.insert("virtio", "v.ko".into(), vec![]);
        index.insert("virtio_ring", "r.ko".into(), vec![]);
        index.insert(
            "virtio_pci",
            "p.ko".into(),
            vec!["virtio".into(), "virtio_ring".into()],
        );
        index.insert(
            "virtio_blk",
            "b.ko".into(),
            vec!["virtio".into(), "virtio_ring".into()],
        );

        let order = index.load_order(&["virtio_pci", "virtio-blk"]).unwrap();
        let names: Vec<&str> = order.iter().map(|(name, _)| name.as_str()).collect();

        assert_eq!(names, ["virtio", "virtio_ring", "virtio_pci", "virtio_blk"]);
    }

    #[test]
    fn names_a_missing_module() {
        let index = ModuleIndex::default();

        let result = index.load_order(&["virtio_net"]);

        assert!(matches!(result, Err(ImageError::MissingModule(name)) if name == "virtio_net"));
    }
}
