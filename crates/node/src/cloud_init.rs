//! cloud-init's NoCloud seed for VMs of cloud-init images: an ISO 9660
//! volume labelled `cidata` (made by `genisoimage`, no mount needed) with
//! `meta-data` (instance id, host name, SSH keys), `network-config` (DHCP
//! on each NIC, matched by MAC) and the user's `user-data`, passed
//! through. It is made again at every boot from what is stored, so it
//! always says the VM's current name and NICs; the instance id is the
//! VM's machine-id, new for every clone, so a clone runs cloud-init's
//! per-instance steps again (host keys, host name).

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bounds on what a create request can make the node store and hand to
/// every boot.
pub const MAX_SSH_KEYS: usize = 32;
pub const MAX_SSH_KEY_BYTES: usize = 16 * 1024;
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// The seed's file name in the VM's directory.
pub const SEED: &str = "seed.iso";

/// Key types OpenSSH 9 accepts in `authorized_keys`.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// What a VM's user asked cloud-init for, as stored with the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// The image's default user, whom the keys are for.
    #[serde(default)]
    pub user: Option<String>,
    /// OpenSSH public key lines, authorized for the image's default user.
    pub ssh_keys: Vec<String>,
    /// Passed through as `user-data`: `#cloud-config` YAML or a script.
    pub user_data: Option<String>,
}

impl CloudConfig {
    /// Checks every key and the user-data; the error is one sentence for
    /// the user.
    pub fn new(
        user: Option<String>,
        ssh_keys: Vec<String>,
        user_data: Option<String>,
    ) -> Result<Self, String> {
        if ssh_keys.len() > MAX_SSH_KEYS {
            return Err(format!(
                "at most {MAX_SSH_KEYS} SSH keys, not {}",
                ssh_keys.len()
            ));
        }
        let ssh_keys = ssh_keys
            .iter()
            .map(|key| check_ssh_key(key))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(user_data) = &user_data {
            check_user_data(user_data)?;
        }
        Ok(CloudConfig {
            user,
            ssh_keys,
            user_data,
        })
    }

    /// What the API shows of it for VM `name`.
    pub fn to_api(&self, name: &str) -> quetzal_api::CloudInit {
        quetzal_api::CloudInit {
            user: self.user.clone(),
            hostname: hostname(name),
            ssh_keys: self
                .ssh_keys
                .iter()
                .filter_map(|k| fingerprint(k))
                .collect(),
            user_data_bytes: self.user_data.as_ref().map(|u| u.len() as u64),
        }
    }
}

/// One OpenSSH public key line (`TYPE BASE64 [COMMENT]`), trimmed; an
/// error names what is wrong with it.
pub fn check_ssh_key(text: &str) -> Result<String, String> {
    let line = text.trim();
    if line.len() > MAX_SSH_KEY_BYTES {
        return Err(format!(
            "an SSH public key is at most {MAX_SSH_KEY_BYTES} bytes"
        ));
    }
    if line.starts_with("-----BEGIN") {
        return Err(
            "that is a private key, not a public one: pass the .pub file (never the private key)"
                .to_owned(),
        );
    }
    if line.chars().any(char::is_control) {
        return Err("an SSH public key is one line".to_owned());
    }
    let mut fields = line.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        return Err("not an SSH public key (expected: TYPE BASE64 [COMMENT])".to_owned());
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "not an SSH public key: unknown key type '{}' (known: {})",
            kind.chars().take(40).collect::<String>(),
            KEY_TYPES.join(", ")
        ));
    }
    let bytes = quetzal_qga::decode(blob)
        .ok_or_else(|| format!("not an SSH public key: the {kind} key is not base64"))?;
    // The blob starts with its own type, length-prefixed.
    let named = bytes
        .get(..4)
        .map(|len| u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .and_then(|len| bytes.get(4..4 + len));
    if named != Some(kind.as_bytes()) {
        return Err(format!(
            "not an SSH public key: the key data is not a {kind} key"
        ));
    }
    Ok(line.to_owned())
}

/// `SHA256:` and the unpadded base64 of the key blob's sha256.
pub fn fingerprint(key: &str) -> Option<String> {
    let blob = quetzal_qga::decode(key.split_whitespace().nth(1)?)?;
    let encoded = quetzal_qga::encode(&Sha256::digest(&blob));
    Some(format!("SHA256:{}", encoded.trim_end_matches('=')))
}

/// user-data cloud-init runs: `#cloud-config` and a YAML mapping, or a
/// script (`#!`).
pub fn check_user_data(text: &str) -> Result<(), String> {
    if text.len() > MAX_USER_DATA_BYTES {
        return Err(format!(
            "user-data is at most {} KiB, not {} bytes",
            MAX_USER_DATA_BYTES / 1024,
            text.len()
        ));
    }
    let first = text.lines().next().unwrap_or("").trim_end();
    if first.starts_with("#!") {
        return Ok(());
    }
    if first != "#cloud-config" {
        return Err(
            "user-data must be a #cloud-config YAML document or a script starting with #!"
                .to_owned(),
        );
    }
    let docs = yaml_rust2::YamlLoader::load_from_str(text)
        .map_err(|err| format!("user-data is not valid YAML: {err}"))?;
    match docs.as_slice() {
        [] | [yaml_rust2::Yaml::Hash(_)] | [yaml_rust2::Yaml::Null] => Ok(()),
        [_] => Err("#cloud-config user-data must be a YAML mapping (key: value)".to_owned()),
        _ => Err("#cloud-config user-data must be one YAML document".to_owned()),
    }
}

/// A VM's host name: its name in lower case, `_` as `-` (a host name has
/// no `_`).
pub fn hostname(vm: &str) -> String {
    vm.to_ascii_lowercase().replace('_', "-")
}

/// Everything one boot's seed says.
#[derive(Clone, Debug)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    pub macs: Vec<String>,
    pub config: CloudConfig,
}

impl Seed {
    /// JSON, which is YAML: no quoting of keys or comments to get wrong.
    pub fn meta_data(&self) -> String {
        serde_json::json!({
            "instance-id": self.instance_id,
            "local-hostname": self.hostname,
            "public-keys": self.config.ssh_keys,
        })
        .to_string()
    }

    /// Network config version 2: DHCP on each NIC, found by its MAC.
    pub fn network_config(&self) -> String {
        let ethernets: serde_json::Map<String, serde_json::Value> = self
            .macs
            .iter()
            .enumerate()
            .map(|(index, mac)| {
                (
                    format!("nic{index}"),
                    serde_json::json!({ "match": { "macaddress": mac }, "dhcp4": true }),
                )
            })
            .collect();
        serde_json::json!({ "version": 2, "ethernets": ethernets }).to_string()
    }

    pub fn user_data(&self) -> &str {
        self.config
            .user_data
            .as_deref()
            .unwrap_or("#cloud-config\n")
    }

    /// Writes the seed volume to `path` (0600: user-data may hold
    /// secrets), through a scratch directory beside it that is removed
    /// on every path.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let scratch = path.with_extension("files");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::DirBuilder::new().mode(0o700).create(&scratch)?;
        let partial = path.with_extension("partial");
        let made = (|| {
            for (name, contents) in [
                ("meta-data", self.meta_data()),
                ("network-config", self.network_config()),
                ("user-data", self.user_data().to_owned()),
            ] {
                std::fs::write(scratch.join(name), contents)?;
            }
            let output = Command::new("genisoimage")
                .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
                .arg(&partial)
                .args(["meta-data", "network-config", "user-data"])
                .current_dir(&scratch)
                .output()
                .map_err(|err| {
                    if err.kind() == std::io::ErrorKind::NotFound {
                        std::io::Error::other(
                            "genisoimage is not installed (install the genisoimage package)",
                        )
                    } else {
                        err
                    }
                })?;
            if !output.status.success() {
                return Err(std::io::Error::other(format!(
                    "genisoimage failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&partial, path)
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        if made.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG/5/B9GhdjSoUXxoepPAdEnocHigQalL5PJOgaB5u/E alice@laptop";

    #[test]
    fn accepts_an_openssh_public_key_line_and_trims_it() {
        let key = check_ssh_key(&format!("  {ED25519}\n")).unwrap();

        assert_eq!(key, ED25519);
    }

    #[test]
    fn refuses_a_private_key_with_a_hint() {
        let result = check_ssh_key("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n");

        assert!(result.unwrap_err().contains("pass the .pub file"));
    }

    #[test]
    fn refuses_lines_that_are_not_keys() {
        for bad in [
            "",
            "hello",
            "ssh-ed25519",
            "ssh-foo AAAA",
            "ssh-ed25519 not*base64",
            // Valid base64, but the blob names another type.
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIG/5/B9GhdjSoUXxoepPAdEnocHigQalL5PJOgaB5u/E",
            "ssh-ed25519 AAAA\nssh-ed25519 AAAA",
        ] {
            assert!(check_ssh_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_a_key_as_ssh_keygen_does() {
        // ssh-keygen -lf on this key prints this fingerprint.
        assert_eq!(
            fingerprint(ED25519).unwrap(),
            "SHA256:FtPnUfMxgAWzqTVnluJ5k91bwZFjmJ1yGk6pFukKIKs"
        );
    }

    #[test]
    fn accepts_cloud_config_mappings_and_scripts() {
        for good in [
            "#cloud-config\npackages: [sqlite3]\nruncmd:\n  - [touch, /x]\n",
            "#cloud-config\n",
            "#!/bin/sh\necho hi > /x\n",
        ] {
            assert_eq!(check_user_data(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn refuses_user_data_cloud_init_would_not_run() {
        let cases = [
            ("packages: [x]\n", "#cloud-config"),
            ("#cloud-config\nruncmd: [unclosed\n", "not valid YAML"),
            ("#cloud-config\n- a list\n", "mapping"),
            ("#cloud-config\na: 1\n---\nb: 2\n", "one YAML document"),
        ];
        for (text, says) in cases {
            let error = check_user_data(text).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        let huge = format!("#!/bin/sh\n{}", "x".repeat(MAX_USER_DATA_BYTES));
        assert!(check_user_data(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn bounds_how_many_keys_a_vm_keeps() {
        let keys = vec![ED25519.to_owned(); MAX_SSH_KEYS + 1];

        assert!(CloudConfig::new(None, keys, None).is_err());
    }

    #[test]
    fn meta_data_names_the_instance_host_and_keys() {
        let config = CloudConfig::new(None, vec![ED25519.to_owned()], None).unwrap();
        let seed = Seed {
            instance_id: "iid-abc".to_owned(),
            hostname: hostname("Web_1"),
            macs: vec!["52:54:00:00:00:01".to_owned()],
            config,
        };

        let meta: serde_json::Value = serde_json::from_str(&seed.meta_data()).unwrap();
        let network: serde_json::Value = serde_json::from_str(&seed.network_config()).unwrap();

        assert_eq!(meta["instance-id"], "iid-abc");
        assert_eq!(meta["local-hostname"], "web-1");
        assert_eq!(meta["public-keys"][0], ED25519);
        assert_eq!(
            network["ethernets"]["nic0"]["match"]["macaddress"],
            "52:54:00:00:00:01"
        );
        assert_eq!(network["ethernets"]["nic0"]["dhcp4"], true);
        assert_eq!(seed.user_data(), "#cloud-config\n");
    }
}
