//! Which accelerator a VM runs on: KVM where the host has usable hardware
//! virtualization, QEMU's software emulation (TCG) everywhere else.
//!
//! The decision is a pure function of what was probed ([`AccelProbe`]), so it
//! can be tested for hosts we do not have.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The accelerator QEMU is told to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's tiny code generator: software emulation, works everywhere.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = AccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(AccelError::Unknown(other.to_owned())),
        }
    }
}

/// The hardware virtualization flag the CPU advertises, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtFlag {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
}

impl fmt::Display for VirtFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VirtFlag::Vmx => "vmx",
            VirtFlag::Svm => "svm",
        })
    }
}

/// What `/dev/kvm` looks like to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmDevice {
    Missing,
    /// It exists but opening it read-write failed (the error says why).
    Unusable(String),
    Usable,
}

/// The inputs of the acceleration decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelProbe {
    pub virt_flag: Option<VirtFlag>,
    pub kvm_device: KvmDevice,
}

/// The accelerator chosen and one line saying why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("unknown accelerator '{0}' (expected kvm or tcg)")]
    Unknown(String),
    #[error("--accel kvm cannot work on this host: {reason}")]
    KvmUnavailable { reason: String },
}

impl AccelProbe {
    /// Probes this host: the flags in /proc/cpuinfo and whether /dev/kvm opens.
    pub fn of_this_host() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        AccelProbe {
            virt_flag: virt_flag(&cpuinfo),
            kvm_device: kvm_device(Path::new("/dev/kvm")),
        }
    }
}

/// Finds `vmx` or `svm` among the CPU flags of a /proc/cpuinfo text.
pub fn virt_flag(cpuinfo: &str) -> Option<VirtFlag> {
    let flags = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))?
        .split_once(':')?
        .1;
    flags.split_whitespace().find_map(|flag| match flag {
        "vmx" => Some(VirtFlag::Vmx),
        "svm" => Some(VirtFlag::Svm),
        _ => None,
    })
}

fn kvm_device(path: &Path) -> KvmDevice {
    if !path.exists() {
        return KvmDevice::Missing;
    }
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => KvmDevice::Usable,
        Err(err) => KvmDevice::Unusable(err.to_string()),
    }
}

/// Picks KVM when the CPU has hardware virtualization and /dev/kvm opens,
/// TCG otherwise.
///
/// A /dev/kvm without vmx/svm is a software KVM (such as PVM): only specially
/// built guest kernels run on it, so stock guests get TCG.
pub fn choose(probe: &AccelProbe) -> AccelChoice {
    let (accel, reason) = match (&probe.virt_flag, &probe.kvm_device) {
        (Some(flag), KvmDevice::Usable) => (
            Accel::Kvm,
            format!("the CPU has hardware virtualization ({flag}) and /dev/kvm is usable"),
        ),
        (Some(flag), KvmDevice::Missing) => (
            Accel::Tcg,
            format!(
                "the CPU has {flag} but /dev/kvm does not exist (is the kvm module loaded?); using software emulation"
            ),
        ),
        (Some(flag), KvmDevice::Unusable(err)) => (
            Accel::Tcg,
            format!("the CPU has {flag} but /dev/kvm cannot be opened ({err}); using software emulation"),
        ),
        (None, KvmDevice::Missing) => (
            Accel::Tcg,
            "the CPU has no hardware virtualization (no vmx/svm flag) and there is no /dev/kvm; using software emulation".to_owned(),
        ),
        (None, _) => (
            Accel::Tcg,
            "/dev/kvm exists but the CPU has no vmx/svm flag (a software KVM such as PVM); stock guests cannot run on it, using software emulation".to_owned(),
        ),
    };
    AccelChoice { accel, reason }
}

/// Applies an expert's `--accel` override: TCG always works, KVM only where
/// [`choose`] would pick it.
pub fn choose_with_override(
    probe: &AccelProbe,
    requested: Option<Accel>,
) -> Result<AccelChoice, AccelError> {
    let automatic = choose(probe);
    match requested {
        None => Ok(automatic),
        Some(Accel::Tcg) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "software emulation requested with --accel tcg".to_owned(),
        }),
        Some(Accel::Kvm) if automatic.accel == Accel::Kvm => Ok(automatic),
        Some(Accel::Kvm) => Err(AccelError::KvmUnavailable {
            reason: automatic.reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(virt_flag: Option<VirtFlag>, kvm_device: KvmDevice) -> AccelProbe {
        AccelProbe {
            virt_flag,
            kvm_device,
        }
    }

    #[test]
    fn finds_vmx_and_svm_in_cpuinfo_flags() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let amd = "flags\t\t: fpu svm lm\n";
        let none = "flags\t\t: fpu vme sse hypervisor\n";

        assert_eq!(virt_flag(intel), Some(VirtFlag::Vmx));
        assert_eq!(virt_flag(amd), Some(VirtFlag::Svm));
        assert_eq!(virt_flag(none), None);
    }

    #[test]
    fn does_not_mistake_a_flag_containing_vmx_for_vmx() {
        let cpuinfo = "flags\t\t: fpu vmx_ept svm_lock\n";

        assert_eq!(virt_flag(cpuinfo), None);
    }

    #[test]
    fn picks_kvm_with_vmx_and_usable_dev_kvm() {
        let choice = choose(&probe(Some(VirtFlag::Vmx), KvmDevice::Usable));

        assert_eq!(choice.accel, Accel::Kvm);
    }

    #[test]
    fn picks_kvm_with_svm_and_usable_dev_kvm() {
        let choice = choose(&probe(Some(VirtFlag::Svm), KvmDevice::Usable));

        assert_eq!(choice.accel, Accel::Kvm);
    }

    #[test]
    fn picks_tcg_for_software_kvm_without_cpu_flag() {
        let choice = choose(&probe(None, KvmDevice::Usable));

        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("no vmx/svm"), "{}", choice.reason);
    }

    #[test]
    fn picks_tcg_when_dev_kvm_is_missing() {
        let choice = choose(&probe(Some(VirtFlag::Vmx), KvmDevice::Missing));

        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.contains("does not exist"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn picks_tcg_when_dev_kvm_cannot_be_opened() {
        let device = KvmDevice::Unusable("Permission denied".to_owned());

        let choice = choose(&probe(Some(VirtFlag::Svm), device));

        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.contains("Permission denied"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn rejects_kvm_override_where_kvm_cannot_work() {
        let result = choose_with_override(&probe(None, KvmDevice::Usable), Some(Accel::Kvm));

        assert!(matches!(result, Err(AccelError::KvmUnavailable { .. })));
    }

    #[test]
    fn accepts_tcg_override_on_a_kvm_host() {
        let choice = choose_with_override(
            &probe(Some(VirtFlag::Vmx), KvmDevice::Usable),
            Some(Accel::Tcg),
        )
        .unwrap();

        assert_eq!(choice.accel, Accel::Tcg);
    }

    #[test]
    fn parses_accel_names() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("hvf".parse::<Accel>().is_err());
    }
}
