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
