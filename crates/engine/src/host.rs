//! What this host offers to VMs: CPUs, memory, hardware virtualization, QEMU.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::accel::{self, Accel, AccelChoice, AccelError, AccelProbe, KvmDevice};

/// The host's capabilities, as `quetzal host info` shows them.
#[derive(Clone, Debug, Serialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Whether the CPU has vmx/svm *and* /dev/kvm opens.
    pub hardware_virtualization: bool,
    /// `vmx`, `svm`, or null.
    pub cpu_virt_flag: Option<accel::VirtFlag>,
    /// `missing`, `usable`, or `unusable: <why>`.
    pub kvm_device: String,
    /// QEMU's version (`7.2.22`), or null when QEMU is not installed.
    pub qemu_version: Option<String>,
    pub accel: Accel,
    pub accel_reason: String,
}

impl HostInfo {
    /// Probes this host, with QEMU's version from `qemu_binary` (none
    /// for an engine without QEMU); `requested` is the `--accel`
    /// override, if any.
    pub fn probe(qemu_binary: Option<&Path>, requested: Option<Accel>) -> Result<Self, AccelError> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let probe = AccelProbe::of_this_host();
        let AccelChoice { accel, reason } = accel::choose_with_override(&probe, requested)?;
        Ok(HostInfo {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            cpus: cpu_count(&cpuinfo),
            memory_mib: memory_total_mib(&meminfo).unwrap_or(0),
            hardware_virtualization: probe.virt_flag.is_some()
                && probe.kvm_device == KvmDevice::Usable,
            cpu_virt_flag: probe.virt_flag,
            kvm_device: match probe.kvm_device {
                KvmDevice::Missing => "missing".to_owned(),
                KvmDevice::Usable => "usable".to_owned(),
                KvmDevice::Unusable(why) => format!("unusable: {why}"),
            },
            qemu_version: qemu_binary.and_then(qemu_version),
            accel,
            accel_reason: reason,
        })
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

fn cpu_count(cpuinfo: &str) -> u32 {
    let listed = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    u32::try_from(listed).unwrap_or(u32::MAX).max(1)
}

/// `MemTotal` of a /proc/meminfo text, in MiB.
pub fn memory_total_mib(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// This host's total memory in MiB.
pub fn host_memory_mib() -> Option<u64> {
    memory_total_mib(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn qemu_version(binary: &Path) -> Option<String> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&output.stdout))
}

/// `7.2.22` from `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`.
pub fn parse_qemu_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_version_line() {
        let text = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022\n";

        assert_eq!(parse_qemu_version(text).as_deref(), Some("7.2.22"));
    }

    #[test]
    fn reads_memtotal_in_mib() {
        let meminfo = "MemTotal:       24683656 kB\nMemFree:        1000 kB\n";

        assert_eq!(memory_total_mib(meminfo), Some(24105));
    }

    #[test]
    fn counts_processors_and_reads_model() {
        let cpuinfo =
            "processor\t: 0\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n";

        assert_eq!(cpu_count(cpuinfo), 2);
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC"));
    }
}
