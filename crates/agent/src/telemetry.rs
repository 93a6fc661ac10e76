//! What the guest reports of itself every few seconds: memory as the
//! kernel counts it (`MemTotal - MemAvailable` is what `free` calls used),
//! load, uptime, and how full each block-device filesystem is.

use quetzal_qga::port::Telemetry;

/// At most this many filesystems go into one report.
const MAX_FILESYSTEMS: usize = 32;

pub fn now() -> Telemetry {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (total, available) = memory(&meminfo);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    Telemetry {
        memory_total_bytes: total,
        memory_used_bytes: total.saturating_sub(available),
        load: load(&loadavg),
        uptime_secs: uptime
            .split_whitespace()
            .next()
            .and_then(|secs| secs.split('.').next()?.parse::<u64>().ok())
            .unwrap_or(0),
        filesystems: crate::filesystems::usage()
            .into_iter()
            .map(|(_, fs)| fs)
            .take(MAX_FILESYSTEMS)
            .collect(),
    }
}

/// `MemTotal` and `MemAvailable` in bytes (`MemFree` where the kernel has
/// no `MemAvailable`).
fn memory(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    let total = field("MemTotal").unwrap_or(0);
    let available = field("MemAvailable").or_else(|| field("MemFree"));
    (total, available.unwrap_or(total))
}

fn load(loadavg: &str) -> [f64; 3] {
    let mut fields = loadavg
        .split_whitespace()
        .map(|field| field.parse::<f64>().unwrap_or(0.0));
    [(); 3].map(|_| fields.next().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_memory_is_total_less_available() {
        let meminfo = "MemTotal:        1014656 kB\nMemFree:          700000 kB\n\
                       MemAvailable:     814656 kB\nBuffers:            1000 kB\n";

        assert_eq!(memory(meminfo), (1014656 * 1024, 814656 * 1024));
        // An old kernel without MemAvailable: free is what is left.
        assert_eq!(
            memory("MemTotal: 2048 kB\nMemFree: 1024 kB\n"),
            (2048 * 1024, 1024 * 1024)
        );
        assert_eq!(memory("garbage"), (0, 0));
    }

    #[test]
    fn reads_the_three_load_averages() {
        assert_eq!(load("0.52 0.31 0.10 1/98 4321\n"), [0.52, 0.31, 0.10]);
        assert_eq!(load(""), [0.0; 3]);
    }
}
