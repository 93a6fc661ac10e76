//! Kernel samepage merging for the node: `off`, `on`, or `auto` (on while
//! the host's memory is in demand), with ksmtuned's pacing — more pages
//! scanned while free memory is short, fewer when it is not.
//!
//! KSM is the host's (`/sys/kernel/mm/ksm`), not one process's: `auto`
//! only ever turns off what it turned on itself, so a node in `auto`
//! leaves alone a KSM someone else runs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The size of the pages KSM counts (x86-64's).
pub const PAGE_BYTES: u64 = 4096;
/// How often the pacing looks at the host's memory (ksmtuned: 60 s).
pub const TICK: Duration = Duration::from_secs(10);
/// ksmtuned's figures: pages per scan from 64 to 1250, 300 more per tick
/// while memory is short, 50 fewer when it is not; 10 ms between scans
/// per 16 GiB of memory; short is less than 20% (at least 2 GiB) free.
const PAGES_MIN: u64 = 64;
const PAGES_MAX: u64 = 1250;
const PAGES_BOOST: u64 = 300;
const PAGES_DECAY: u64 = 50;
const SLEEP_MS_PER_16_GIB: u64 = 10;
const SHORT_PERCENT: u64 = 20;
const SHORT_MIN_MIB: u64 = 2048;
/// `auto` runs KSM once less than this share of memory is available, and
/// stops it again above the second.
const AUTO_ON_BELOW_PERCENT: u64 = 40;
const AUTO_OFF_ABOVE_PERCENT: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KsmMode {
    /// Turned off at start, and kept off.
    Off,
    /// Always on.
    On,
    /// On while less than 40% of the host's memory is available, off
    /// again above 50% (only if this node turned it on).
    #[default]
    Auto,
}

impl KsmMode {
    pub const ALL: [KsmMode; 3] = [KsmMode::Off, KsmMode::On, KsmMode::Auto];

    pub fn as_str(self) -> &'static str {
        match self {
            KsmMode::Off => "off",
            KsmMode::On => "on",
            KsmMode::Auto => "auto",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|mode| mode.as_str() == text)
    }
}

/// The host's memory, in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub total_mib: u64,
    pub available_mib: u64,
}

impl Memory {
    pub fn of_this_host() -> Option<Memory> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = info.lines().find(|line| line.starts_with(name))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
        };
        Some(Memory {
            total_mib: field("MemTotal:")?,
            available_mib: field("MemAvailable:")?,
        })
    }
}

/// What to write to KSM's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Start or stop it; `None`: leave `run` as it is.
    pub run: Option<bool>,
    /// Whether to write the pacing (only while this node runs KSM).
    pub pace: bool,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

/// The pacing's memory between ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    pub mode: KsmMode,
    pages: u64,
    /// Whether this node has KSM running (it turned it on).
    started: bool,
    first: bool,
}

impl Pacer {
    pub fn new(mode: KsmMode) -> Self {
        Pacer {
            mode,
            pages: PAGES_MIN,
            started: false,
            first: true,
        }
    }

    /// The setting for this tick, given the host's memory now.
    pub fn tick(&mut self, memory: Memory) -> Setting {
        let total = memory.total_mib.max(1);
        let short = (total * SHORT_PERCENT / 100).max(SHORT_MIN_MIB.min(total));
        self.pages = if memory.available_mib < short {
            (self.pages + PAGES_BOOST).min(PAGES_MAX)
        } else {
            self.pages.saturating_sub(PAGES_DECAY).max(PAGES_MIN)
        };
        let run = match self.mode {
            KsmMode::Off => self.first.then_some(false),
            KsmMode::On => (self.first || !self.started).then_some(true),
            KsmMode::Auto => {
                let percent = memory.available_mib * 100 / total;
                if !self.started && percent < AUTO_ON_BELOW_PERCENT {
                    Some(true)
                } else if self.started && percent > AUTO_OFF_ABOVE_PERCENT {
                    Some(false)
                } else {
                    None
                }
            }
        };
        if let Some(run) = run {
            self.started = run;
        }
        self.first = false;
        Setting {
            run,
            pace: self.mode != KsmMode::Off && self.started,
            pages_to_scan: self.pages,
            sleep_millisecs: (SLEEP_MS_PER_16_GIB * 16 * 1024 / total).max(1),
        }
    }
}

/// What KSM does now, from its sysfs files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub running: bool,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    pub full_scans: u64,
}

/// The host's KSM, under `/sys/kernel/mm/ksm` (a test gives another
/// directory), paced by one node.
#[derive(Debug)]
pub struct Ksm {
    dir: PathBuf,
    pacer: Mutex<Pacer>,
}

impl Ksm {
    /// The host's KSM in `mode`; `None` where the kernel has none.
    pub fn of_this_host(mode: KsmMode) -> Option<Ksm> {
        Self::at(Path::new("/sys/kernel/mm/ksm"), mode)
    }

    pub fn at(dir: &Path, mode: KsmMode) -> Option<Ksm> {
        dir.join("run").exists().then(|| Ksm {
            dir: dir.to_owned(),
            pacer: Mutex::new(Pacer::new(mode)),
        })
    }

    pub fn mode(&self) -> KsmMode {
        self.pacer.lock().expect("never poisoned").mode
    }

    /// Applies this tick's setting; a knob that cannot be written is
    /// logged (a read-only sysfs: KSM is then as the host has it).
    pub fn tick(&self, memory: Memory) {
        let setting = self.pacer.lock().expect("never poisoned").tick(memory);
        let write = |knob: &str, value: u64| {
            if let Err(err) = std::fs::write(self.dir.join(knob), value.to_string()) {
                tracing::warn!(knob, error = %err, "cannot set KSM");
            }
        };
        if setting.pace {
            write("pages_to_scan", setting.pages_to_scan);
            write("sleep_millisecs", setting.sleep_millisecs);
        }
        if let Some(run) = setting.run {
            tracing::info!(mode = self.mode().as_str(), run, "KSM");
            write("run", u64::from(run));
        }
    }

    pub fn counters(&self) -> Counters {
        let read = |knob: &str| -> u64 {
            std::fs::read_to_string(self.dir.join(knob))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0)
        };
        Counters {
            running: read("run") == 1,
            pages_shared: read("pages_shared"),
            pages_sharing: read("pages_sharing"),
            pages_to_scan: read("pages_to_scan"),
            sleep_millisecs: read("sleep_millisecs"),
            full_scans: read("full_scans"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLENTY: Memory = Memory {
        total_mib: 24 * 1024,
        available_mib: 20 * 1024,
    };
    const TIGHT: Memory = Memory {
        total_mib: 24 * 1024,
        available_mib: 3 * 1024,
    };
    const HALF: Memory = Memory {
        total_mib: 24 * 1024,
        available_mib: 11 * 1024,
    };

    #[test]
    fn on_and_off_say_so_once_and_auto_follows_memory_with_hysteresis() {
        let mut on = Pacer::new(KsmMode::On);
        let mut off = Pacer::new(KsmMode::Off);
        let mut auto = Pacer::new(KsmMode::Auto);

        assert_eq!(
            [on.tick(PLENTY).run, on.tick(PLENTY).run],
            [Some(true), None]
        );
        assert_eq!(
            [off.tick(TIGHT).run, off.tick(TIGHT).run],
            [Some(false), None]
        );
        // Plenty free: auto leaves KSM alone (it may be someone else's).
        let alone = auto.tick(PLENTY);
        assert_eq!((alone.run, alone.pace), (None, false));
        assert_eq!(auto.tick(TIGHT).run, Some(true));
        // Between the two thresholds: as it is.
        assert_eq!(auto.tick(HALF).run, None);
        assert_eq!(auto.tick(PLENTY).run, Some(false));
        assert_eq!(auto.tick(PLENTY).run, None);
    }

    #[test]
    fn pacing_scans_more_while_memory_is_short_within_ksmtuneds_bounds() {
        let mut pacer = Pacer::new(KsmMode::On);

        let tight: Vec<u64> = (0..6).map(|_| pacer.tick(TIGHT).pages_to_scan).collect();
        let relaxed: Vec<u64> = (0..30).map(|_| pacer.tick(PLENTY).pages_to_scan).collect();

        assert_eq!(tight, [364, 664, 964, 1250, 1250, 1250]);
        assert_eq!(relaxed[0], 1200);
        assert_eq!(*relaxed.last().unwrap(), 64);
        // 10 ms per 16 GiB: 24 GiB scans every 6 ms.
        assert_eq!(pacer.tick(PLENTY).sleep_millisecs, 6);
    }

    #[test]
    fn the_knobs_are_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        for knob in ["run", "pages_to_scan", "sleep_millisecs", "pages_sharing"] {
            std::fs::write(dir.path().join(knob), "0\n").unwrap();
        }
        std::fs::write(dir.path().join("pages_sharing"), "42\n").unwrap();
        let ksm = Ksm::at(dir.path(), KsmMode::On).unwrap();

        ksm.tick(PLENTY);
        let counters = ksm.counters();

        assert!(counters.running);
        assert_eq!(counters.pages_sharing, 42);
        assert_eq!(counters.pages_to_scan, 64);
        assert!(Ksm::at(&dir.path().join("absent"), KsmMode::On).is_none());
    }
}
