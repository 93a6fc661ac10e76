//! `quetzal-bench node`: quetzald beside libvirt 9 + QEMU from Debian, the
//! same tiny guest on both, in the same run:
//!
//! - create and start: from the command (`quetzal vm create --start`, or
//!   `qemu-img create` + `virsh define; start`) until the guest's first
//!   line of userland (`tiny: up`) is in its serial log;
//! - list latency with 200 VMs defined (`GET /api/v1/vms` on the Unix
//!   socket; libvirt's `listAllDomains` + each domain's state through the
//!   Python binding, which is what `virsh list --all` asks);
//! - daemon resident memory idle and with 20 running VMs (quetzald with
//!   its HTTPS listener on), and CPU use while those 20 run.
//!
//! Needs libvirt running (`scripts/bench-setup`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quetzal_image::{Image, ImageStore};

use crate::stats::{median, millis, percentile, row, summary};

pub(crate) const PREFIX: &str = "qbench";
const LIST_VMS: usize = 200;
const RUNNING_VMS: usize = 20;
const LIST_CALLS: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let image = ImageStore::new(&quetzal_image::data_dir()).get("tiny")?;
    let (_scratch, data, lv) = scratch()?;
    // With its HTTPS listener, as a node serving a dashboard runs.
    let daemon = Daemon::start_with(&bin.join("quetzald"), &data, &["--listen", "127.0.0.1:0"])?;

    let quetzal = bin.join("quetzal");
    let result = measure(runs, &quetzal, &daemon, &image, &lv);
    cleanup_libvirt();
    drop(daemon);
    result
}

fn measure(
    runs: usize,
    quetzal: &Path,
    daemon: &Daemon,
    image: &Image,
    lv: &Path,
) -> anyhow::Result<()> {
    let idle_quetzald = rss(daemon.pid());
    let idle_libvirtd = rss(libvirtd_pid()?);

    eprintln!("bench: create and start, {runs} runs each");
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        let name = format!("{PREFIX}-cs{run}");
        let start = Instant::now();
        quetzal_cli(quetzal, &daemon.data, &["vm", "create", &name, "--start"])?;
        wait_for_line(&daemon.data.join("vms").join(&name).join("console.log"))?;
        ours.push(start.elapsed());
        quetzal_cli(quetzal, &daemon.data, &["vm", "stop", &name, "--force"])?;
        quetzal_cli(quetzal, &daemon.data, &["vm", "rm", &name])?;

        let start = Instant::now();
        let log = libvirt_define(image, lv, &name)?;
        virsh(&[&format!("start {name}")])?;
        wait_for_line(&log)?;
        theirs.push(start.elapsed());
        virsh(&[&format!("destroy {name}"), &format!("undefine {name}")])?;
    }

    eprintln!("bench: defining {LIST_VMS} VMs on each");
    for i in 0..LIST_VMS {
        let name = format!("{PREFIX}-{i:03}");
        let body = format!(r#"{{"name": "{name}", "memory_mib": 128}}"#);
        let (status, answer) = daemon.request("POST", "/api/v1/vms", Some(&body))?;
        if status != 201 {
            bail!("create {name}: {status} {answer}");
        }
        libvirt_define(image, lv, &name)?;
    }
    eprintln!("bench: {LIST_CALLS} list calls on each");
    let mut ours_list = Vec::new();
    for _ in 0..LIST_CALLS {
        let start = Instant::now();
        let (status, body) = daemon.request("GET", "/api/v1/vms", None)?;
        ours_list.push(start.elapsed());
        if status != 200 || body.len() < 100 * LIST_VMS {
            bail!("list answered {status} with {} bytes", body.len());
        }
    }
    let theirs_list = libvirt_list_latencies()?;

    eprintln!("bench: starting {RUNNING_VMS} VMs on each");
    for i in 0..RUNNING_VMS {
        let name = format!("{PREFIX}-{i:03}");
        let (status, answer) =
            daemon.request("POST", &format!("/api/v1/vms/{name}/start"), None)?;
        if status != 200 {
            bail!("start {name}: {status} {answer}");
        }
        virsh(&[&format!("start {name}")])?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let busy_quetzald = rss(daemon.pid());
    let busy_libvirtd = rss(libvirtd_pid()?);
    let window = Duration::from_secs(10);
    let (cpu_quetzald, cpu_libvirtd) = cpu_share(daemon.pid(), libvirtd_pid()?, window);

    println!("| measure | quetzald median (min–max) | libvirt median (min–max) | ratio |");
    println!("|---|---|---|---|");
    row(
        &format!("create and start to first guest line ({runs} runs)"),
        &ours,
        &theirs,
    );
    println!(
        "| list, {LIST_VMS} VMs defined: p50 / p99 ({LIST_CALLS} calls) | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2}× / {:.2}× |",
        millis(percentile(&ours_list, 50)),
        millis(percentile(&ours_list, 99)),
        millis(percentile(&theirs_list, 50)),
        millis(percentile(&theirs_list, 99)),
        ratio(percentile(&ours_list, 50), percentile(&theirs_list, 50)),
        ratio(percentile(&ours_list, 99), percentile(&theirs_list, 99)),
    );
    println!(
        "| daemon resident memory, no VM running | {:.1} MiB | {:.1} MiB (libvirtd) | — |",
        mib(idle_quetzald),
        mib(idle_libvirtd)
    );
    println!(
        "| daemon resident memory, {RUNNING_VMS} VMs running | {:.1} MiB | {:.1} MiB (libvirtd) | — |",
        mib(busy_quetzald),
        mib(busy_libvirtd)
    );
    println!(
        "| daemon CPU with {RUNNING_VMS} VMs running ({}s window) | {cpu_quetzald:.2}% of a core | {cpu_libvirtd:.2}% of a core | — |",
        window.as_secs()
    );
    eprintln!(
        "bench: create-and-start quetzal {} libvirt {}",
        summary(&ours),
        summary(&theirs)
    );
    eprintln!(
        "bench: list medians quetzal {:?} libvirt {:?}",
        median(&ours_list),
        median(&theirs_list)
    );
    Ok(())
}

/// Checks that libvirt answers and makes a scratch directory: a data
/// directory for the bench's quetzald (sharing the user's images) and one
/// for libvirt's files. Domains left by an interrupted run are removed.
/// A scratch quetzald data directory that sees the built images.
pub(crate) fn scratch_data() -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let scratch = tempfile::Builder::new()
        .prefix("qbench-")
        .tempdir_in("/var/tmp")?;
    let data = scratch.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::os::unix::fs::symlink(
        quetzal_image::data_dir().join("images"),
        data.join("images"),
    )?;
    Ok((scratch, data))
}

pub(crate) fn scratch() -> anyhow::Result<(tempfile::TempDir, PathBuf, PathBuf)> {
    let virsh_ok = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !virsh_ok {
        bail!("libvirt is not running: run scripts/bench-setup first");
    }
    cleanup_libvirt();
    let (scratch, data) = scratch_data()?;
    let lv = scratch.path().join("libvirt");
    std::fs::create_dir_all(&lv)?;
    Ok((scratch, data, lv))
}

pub(crate) fn ratio(ours: Duration, theirs: Duration) -> f64 {
    ours.as_secs_f64() / theirs.as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    // Exact for any memory size we can have.
    #[allow(clippy::cast_precision_loss)]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

/// A quetzald on the bench's own data directory.
pub(crate) struct Daemon {
    child: Child,
    binary: PathBuf,
    pub(crate) data: PathBuf,
}

impl Daemon {
    pub(crate) fn start(binary: &Path, data: &Path) -> anyhow::Result<Self> {
        Self::start_with(binary, data, &[])
    }

    /// Starts quetzald with more arguments (`--listen ADDR`).
    pub(crate) fn start_with(binary: &Path, data: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new(binary)
            .args(args)
            .env("QUETZAL_DATA_DIR", data)
            .env("QUETZAL_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let daemon = Daemon {
            child,
            binary: binary.to_owned(),
            data: data.to_owned(),
        };
        let start = Instant::now();
        while daemon.request("GET", "/api/v1/vms", None).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("quetzald did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One request on a new connection, as a CLI would make it.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let mut stream = UnixStream::connect(self.data.join("quetzald.sock"))?;
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("an HTTP status")?;
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((status, body))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // VMs outlive their daemon by design: end the bench's own.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &format!("{}/vms/", self.data.display())])
            .status();
        quetzal_engine::qemu::sandbox::cgroup::remove_all_blocking(&self.data.join("vms"));
        let _ = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--remove-networks")
            .status();
    }
}

pub(crate) fn quetzal_cli(quetzal: &Path, data: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(quetzal)
        .args(args)
        .env("QUETZAL_DATA_DIR", data)
        .output()?;
    if !output.status.success() {
        bail!(
            "quetzal {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Waits until the guest's userland printed its first line in `log`.
pub(crate) fn wait_for_line(log: &Path) -> anyhow::Result<()> {
    wait_for(log, b"tiny: up")
}

/// Waits until `needle` is in `log`.
pub(crate) fn wait_for(log: &Path, needle: &[u8]) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if std::fs::read(log).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle)) {
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            bail!("no guest output in {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn virsh(commands: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("virsh")
        .args(["-c", "qemu:///system", "-q", &commands.join("; ")])
        .output()?;
    if !output.status.success() {
        bail!(
            "virsh {commands:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Makes the overlay and defines the same guest in libvirt; its serial log.
pub(crate) fn libvirt_define(image: &Image, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    libvirt_define_with(image, &image.root_disk(), dir, name, 128)
}

/// Defines the tiny guest with its overlay on `base` and `memory_mib`.
pub(crate) fn libvirt_define_with(
    image: &Image,
    base: &Path,
    dir: &Path,
    name: &str,
    memory_mib: u64,
) -> anyhow::Result<PathBuf> {
    let overlay = dir.join(format!("{name}.qcow2"));
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    quetzal_engine::disk::create_overlay(base, quetzal_engine::spec::DiskFormat::Qcow2, &overlay)?;
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>{append}</cmdline></os>
  <features><acpi/></features><on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><model type='virtio'/><rom enabled='no'/></interface>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/><panic model='isa'/>
  </devices></domain>",
        kernel = image.kernel().expect("tiny has a kernel").display(),
        initrd = image.initrd().expect("tiny has an initrd").display(),
        append = image.manifest.append,
        disk = overlay.display(),
        log = log.display(),
    );
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml)?;
    virsh(&[&format!("define {}", file.display())])?;
    Ok(log)
}

/// Latencies of `listAllDomains` + each domain's state, through libvirt's
/// Python binding (Debian's python3), in one process like a client's.
fn libvirt_list_latencies() -> anyhow::Result<Vec<Duration>> {
    let script = format!(
        "import libvirt, time, json
conn = libvirt.open('qemu:///system')
out = []
for _ in range({LIST_CALLS}):
    t = time.perf_counter()
    doms = conn.listAllDomains(0)
    rows = [(d.name(), d.state()[0]) for d in doms]
    out.append(time.perf_counter() - t)
    assert len(rows) >= {LIST_VMS}
print(json.dumps(out))"
    );
    let output = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()?;
    if !output.status.success() {
        bail!(
            "python3-libvirt: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let seconds: Vec<f64> = serde_json::from_slice(&output.stdout)?;
    Ok(seconds.into_iter().map(Duration::from_secs_f64).collect())
}

pub(crate) fn cleanup_libvirt() {
    let Ok(output) = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
    else {
        return;
    };
    for name in String::from_utf8_lossy(&output.stdout).lines() {
        if name.starts_with(PREFIX) {
            let _ = virsh(&[&format!("destroy {name}")]);
            let _ = virsh(&[&format!("undefine {name}")]);
        }
    }
}

fn libvirtd_pid() -> anyhow::Result<u32> {
    let output = Command::new("pidof").arg("libvirtd").output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .context("libvirtd is not running")
}

fn rss(pid: u32) -> u64 {
    quetzal_engine::qemu::Usage::of_pid(pid).map_or(0, |u| u.resident_bytes)
}

/// Percent of one core each process used over `window`.
fn cpu_share(a: u32, b: u32, window: Duration) -> (f64, f64) {
    let cpu = |pid| quetzal_engine::qemu::Usage::of_pid(pid).map_or(0, |u| u.cpu_millis);
    let (a0, b0) = (cpu(a), cpu(b));
    std::thread::sleep(window);
    let (a1, b1) = (cpu(a), cpu(b));
    let share = |used: u64| {
        #[allow(clippy::cast_precision_loss)]
        let used = used as f64;
        used / window.as_secs_f64() / 10.0
    };
    (share(a1 - a0), share(b1 - b0))
}
