//! `GET /metrics` in Prometheus text format.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use quetzal_api::VmState;

use super::{ApiError, AppState};

pub async fn metrics(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let vms = app.node.list(None, &[])?;
    let stats = app.node.stats().await;
    let mut out = String::new();

    family(
        &mut out,
        "quetzal_vms",
        "gauge",
        "VMs on this node by state.",
    );
    for state in VmState::ALL {
        let count = vms.iter().filter(|vm| vm.state == state).count();
        let _ = writeln!(out, "quetzal_vms{{state=\"{}\"}} {count}", state.as_str());
    }
    family(
        &mut out,
        "quetzal_vm_state",
        "gauge",
        "1 for the state each VM is in.",
    );
    for vm in &vms {
        let _ = writeln!(
            out,
            "quetzal_vm_state{{vm=\"{}\",state=\"{}\"}} 1",
            vm.name,
            vm.state.as_str()
        );
    }
    family(
        &mut out,
        "quetzal_vm_cpu_seconds_total",
        "counter",
        "CPU time used by the VM's engine process.",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_cpu_seconds_total{{vm=\"{name}\"}} {:.3}",
            millis_to_secs(s.cpu_millis)
        );
    }
    family(
        &mut out,
        "quetzal_vm_resident_bytes",
        "gauge",
        "Resident memory of the VM's engine process.",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_resident_bytes{{vm=\"{name}\"}} {}",
            s.resident_bytes
        );
    }
    family(
        &mut out,
        "quetzal_vm_disk_read_bytes_total",
        "counter",
        "Bytes the guest read from its disks.",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_disk_read_bytes_total{{vm=\"{name}\"}} {}",
            s.disk_read_bytes
        );
    }
    family(
        &mut out,
        "quetzal_vm_disk_written_bytes_total",
        "counter",
        "Bytes the guest wrote to its disks.",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_disk_written_bytes_total{{vm=\"{name}\"}} {}",
            s.disk_written_bytes
        );
    }
    family(
        &mut out,
        "quetzal_vm_network_receive_bytes_total",
        "counter",
        "Bytes the guest received on its NIC (managed networks only).",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_network_receive_bytes_total{{vm=\"{name}\"}} {}",
            s.net_received_bytes
        );
    }
    family(
        &mut out,
        "quetzal_vm_network_transmit_bytes_total",
        "counter",
        "Bytes the guest sent on its NIC (managed networks only).",
    );
    for (name, s) in &stats {
        let _ = writeln!(
            out,
            "quetzal_vm_network_transmit_bytes_total{{vm=\"{name}\"}} {}",
            s.net_sent_bytes
        );
    }
    for (metric, help, pick) in [
        (
            "quetzal_vm_guest_filesystem_used_bytes",
            "Bytes used in each guest filesystem, as its agent says.",
            (|fs| fs.used_bytes) as fn(&quetzal_api::GuestFilesystem) -> u64,
        ),
        (
            "quetzal_vm_guest_filesystem_size_bytes",
            "Size of each guest filesystem, as its agent says.",
            |fs| fs.total_bytes,
        ),
    ] {
        family(&mut out, metric, "gauge", help);
        for vm in &vms {
            for fs in vm.agent.iter().flat_map(|agent| &agent.filesystems) {
                let _ = writeln!(
                    out,
                    "{metric}{{vm=\"{}\",mountpoint=\"{}\"}} {}",
                    vm.name,
                    label(&fs.mountpoint),
                    pick(fs)
                );
            }
        }
    }
    for (metric, help, pick) in [
        (
            "quetzal_vm_guest_memory_used_bytes",
            "Memory the guest uses (total less available), as it says.",
            (|m| m.used_bytes) as fn(&quetzal_api::GuestMemory) -> u64,
        ),
        (
            "quetzal_vm_guest_memory_total_bytes",
            "Memory the guest's kernel has, as it says.",
            |m| m.total_bytes,
        ),
    ] {
        family(&mut out, metric, "gauge", help);
        for vm in &vms {
            if let Some(memory) = &vm.guest_memory {
                let _ = writeln!(
                    out,
                    "{metric}{{vm=\"{}\",source=\"{}\"}} {}",
                    vm.name,
                    memory.source,
                    pick(memory)
                );
            }
        }
    }
    memory_sharing(&mut out, &vms, &stats, app.node.ksm());
    let own = quetzal_engine::Usage::of_this_process();
    family(
        &mut out,
        "quetzal_daemon_up",
        "gauge",
        "1 while quetzald serves.",
    );
    out.push_str("quetzal_daemon_up 1\n");
    family(
        &mut out,
        "quetzal_daemon_resident_bytes",
        "gauge",
        "quetzald's resident memory.",
    );
    let _ = writeln!(
        out,
        "quetzal_daemon_resident_bytes {}",
        own.map_or(0, |u| u.resident_bytes)
    );
    family(
        &mut out,
        "quetzal_daemon_cpu_seconds_total",
        "counter",
        "CPU time used by quetzald.",
    );
    let _ = writeln!(
        out,
        "quetzal_daemon_cpu_seconds_total {:.3}",
        millis_to_secs(own.map_or(0, |u| u.cpu_millis))
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// Each VM's share of host memory, the host's KSM, and what sharing
/// saves.
fn memory_sharing(
    out: &mut String,
    vms: &[quetzal_api::Vm],
    stats: &[(String, crate::supervisor::Stats)],
    ksm: Option<&crate::ksm::Ksm>,
) {
    type Pick = fn(&quetzal_engine::MemoryUse) -> Option<u64>;
    let families: [(&str, &str, Pick); 5] = [
        (
            "quetzal_vm_memory_pss_bytes",
            "Proportional set size of the VM's engine process (shared pages divided among their users).",
            |m| Some(m.pss_bytes),
        ),
        (
            "quetzal_vm_memory_private_bytes",
            "Resident memory only the VM's engine process holds.",
            |m| Some(m.private_bytes),
        ),
        (
            "quetzal_vm_memory_shared_bytes",
            "Resident memory the VM's engine process shares (a template's, KSM's).",
            |m| Some(m.shared_bytes),
        ),
        (
            "quetzal_vm_memory_template_shared_bytes",
            "Of an instant clone's RAM, what is still its warm template's, shared.",
            |m| m.template_shared_bytes,
        ),
        (
            "quetzal_vm_memory_ksm_merged_bytes",
            "Of the VM's memory, what KSM merged with identical pages.",
            |m| Some(m.ksm_merged_bytes),
        ),
    ];
    for (metric, help, pick) in families {
        family(out, metric, "gauge", help);
        for (name, s) in stats {
            if let Some(value) = s.memory.as_ref().and_then(pick) {
                let _ = writeln!(out, "{metric}{{vm=\"{name}\"}} {value}");
            }
        }
    }
    // One copy of a template's pages is resident however many clones
    // map it: each clone's share beyond the largest is saved.
    let mut by_template: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for (name, s) in stats {
        let template = vms
            .iter()
            .find(|vm| &vm.name == name)
            .and_then(|vm| vm.linked_to.as_deref());
        if let (Some(template), Some(shared)) =
            (template, s.memory.and_then(|m| m.template_shared_bytes))
        {
            by_template.entry(template).or_default().push(shared);
        }
    }
    let templates_saved: u64 = by_template
        .values()
        .map(|shares| shares.iter().sum::<u64>() - shares.iter().max().unwrap_or(&0))
        .sum();
    family(
        out,
        "quetzal_memory_saved_bytes",
        "gauge",
        "Host memory sharing saves: instant clones mapping their template's RAM, and KSM.",
    );
    let _ = writeln!(
        out,
        "quetzal_memory_saved_bytes{{by=\"templates\"}} {templates_saved}"
    );
    let Some(ksm) = ksm else {
        return;
    };
    let counters = ksm.counters();
    let _ = writeln!(
        out,
        "quetzal_memory_saved_bytes{{by=\"ksm\"}} {}",
        counters.pages_sharing * crate::ksm::PAGE_BYTES
    );
    for (metric, help, value) in [
        (
            "quetzal_ksm_running",
            "1 while the host's KSM runs.",
            u64::from(counters.running),
        ),
        (
            "quetzal_ksm_pages_shared",
            "Pages KSM keeps one copy of.",
            counters.pages_shared,
        ),
        (
            "quetzal_ksm_pages_sharing",
            "Mappings sharing those copies (pages saved).",
            counters.pages_sharing,
        ),
        (
            "quetzal_ksm_pages_to_scan",
            "Pages KSM scans per round (the pacing).",
            counters.pages_to_scan,
        ),
        (
            "quetzal_ksm_full_scans_total",
            "Times KSM scanned all mergeable memory.",
            counters.full_scans,
        ),
    ] {
        let kind = if metric.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(out, metric, kind, help);
        let _ = writeln!(out, "{metric} {value}");
    }
    family(
        out,
        "quetzal_ksm_mode",
        "gauge",
        "1 for the node's KSM mode.",
    );
    let _ = writeln!(
        out,
        "quetzal_ksm_mode{{mode=\"{}\"}} 1",
        ksm.mode().as_str()
    );
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn millis_to_secs(millis: u64) -> f64 {
    // Exact for any CPU time below 2^53 ms.
    #[allow(clippy::cast_precision_loss)]
    let millis = millis as f64;
    millis / 1000.0
}

/// A label value as Prometheus' text format writes it: what a guest says
/// cannot end the value or the line.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod label_tests {
    #[test]
    fn escapes_what_would_end_a_label_or_a_line() {
        assert_eq!(super::label("/data"), "/data");
        assert_eq!(super::label("/x\"} 1\nfake 2\\"), "/x\\\"} 1\\nfake 2\\\\");
    }
}
