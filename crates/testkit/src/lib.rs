//! What every end-to-end test needs: the shared `tiny` image (built once,
//! by the real builder), a temporary data directory, and a reader that
//! collects what a guest prints so a test can wait for a line.
//!
//! Everything lives under `target/quetzal-tests/`, so `scripts/test` can
//! check afterwards that no process is left running from there.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use quetzal_image::{Image, ImageStore};

/// The tiny guest's whole shell prompt: the text, then the line editor's
/// cursor-position query.
pub const PROMPT: &str = "tiny:/# \u{1b}[6n";
/// How long a guest may take to do something under TCG on a busy host.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/quetzal-tests` in the workspace.
pub fn tests_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/quetzal-tests");
    std::fs::create_dir_all(&root).expect("target/ is writable");
    std::fs::canonicalize(&root).expect("it was just created")
}

/// The data directory whose `images/` every test shares.
pub fn shared_data_dir() -> PathBuf {
    tests_root().join("shared")
}

/// Image `name` from the shared data directory, built by the real builder
/// the first time a test needs it (`scripts/test` builds every image up
/// front, so a new recipe is picked up).
fn built(name: &str) -> Image {
    let store = ImageStore::new(&shared_data_dir());
    if let Ok(image) = store.get(name) {
        return image;
    }
    store
        .build(name, &mut |line| eprintln!("testkit: {line}"))
        .unwrap_or_else(|err| panic!("the {name} image builds: {err}"));
    store
        .get(name)
        .unwrap_or_else(|err| panic!("the {name} image was just built: {err}"))
}

/// The `tiny` image.
pub fn tiny() -> Image {
    built("tiny")
}

/// The `debian` image (about a minute to build, from Debian's archive).
pub fn debian() -> Image {
    built("debian")
}

/// The `desktop` image (a few minutes to build).
pub fn desktop() -> Image {
    built("desktop")
}

/// How long a Debian guest may take to boot (about 30 s alone under TCG
/// here; several at once on two cores take longer).
pub const DEBIAN_TIMEOUT: Duration = Duration::from_secs(400);

/// A temporary data directory that sees the shared images.
#[derive(Debug)]
pub struct DataDir {
    dir: tempfile::TempDir,
}

impl DataDir {
    pub fn new() -> Self {
        tiny();
        let dir = tempfile::Builder::new()
            .prefix("data-")
            .tempdir_in(tests_root())
            .expect("a temp dir under target/");
        std::os::unix::fs::symlink(shared_data_dir().join("images"), dir.path().join("images"))
            .expect("a symlink in a fresh temp dir");
        DataDir { dir }
    }

    /// A temporary data directory with no images at all (a fresh node).
    pub fn empty() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("data-")
            .tempdir_in(tests_root())
            .expect("a temp dir under target/");
        DataDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for DataDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A tmpfs of a given size mounted on a directory (a host disk that
/// fills up), unmounted when dropped — lazily, since a failed test's QEMU
/// may still hold files there. Bind it after the daemon that uses it, so
/// it is dropped before the daemon's data directory is removed.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a `size` (`16M`) tmpfs on `dir`, made if missing.
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("the directory can be made");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(mounted.success(), "this test mounts a tmpfs (needs root)");
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// What a [`Transcript`] read so far, and whether the stream ended.
#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    ended: bool,
}

/// Collects everything read from a stream on a background thread.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    inner: Arc<(Mutex<Buffer>, Condvar)>,
}

impl Transcript {
    /// Starts reading `source` until it ends.
    pub fn read_from(mut source: impl Read + Send + 'static) -> Self {
        let transcript = Transcript::default();
        let inner = Arc::clone(&transcript.inner);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let read = source.read(&mut buf);
                let (lock, changed) = &*inner;
                let mut state = lock.lock().expect("no panics while holding the lock");
                match read {
                    Ok(0) | Err(_) => {
                        state.ended = true;
                        changed.notify_all();
                        return;
                    }
                    Ok(n) => state.bytes.extend_from_slice(&buf[..n]),
                }
                changed.notify_all();
            }
        });
        transcript
    }

    /// Waits up to `timeout` for the stream to end (its writer exited and
    /// everything it wrote is read); whether it did.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let (lock, changed) = &*self.inner;
        let state = lock.lock().expect("no panics while holding the lock");
        let (state, _) = changed
            .wait_timeout_while(state, timeout, |state| !state.ended)
            .expect("no panics while holding the lock");
        state.ended
    }

    /// All text so far.
    pub fn text(&self) -> String {
        let state = self
            .inner
            .0
            .lock()
            .expect("no panics while holding the lock");
        String::from_utf8_lossy(&state.bytes).into_owned()
    }

    /// Waits until `needle` appears after byte `from` and returns the offset
    /// just past it. Panics with the transcript on timeout or end of stream.
    pub fn wait_for_after(&self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.inner;
        let mut state = lock.lock().expect("no panics while holding the lock");
        loop {
            let start = from.min(state.bytes.len());
            if let Some(at) = find(&state.bytes[start..], needle.as_bytes()) {
                return start + at + needle.len();
            }
            let now = Instant::now();
            assert!(
                !state.ended && now < deadline,
                "waited for {needle:?} ({}); got:\n{}",
                if state.ended {
                    "stream ended"
                } else {
                    "timed out"
                },
                String::from_utf8_lossy(&state.bytes)
            );
            state = changed
                .wait_timeout(state, deadline - now)
                .expect("no panics while holding the lock")
                .0;
        }
    }

    /// Waits for `needle` anywhere.
    pub fn wait_for(&self, needle: &str) -> usize {
        self.wait_for_after(0, needle, GUEST_TIMEOUT)
    }

    /// The current length, to wait for something printed from now on.
    pub fn len(&self) -> usize {
        self.inner
            .0
            .lock()
            .expect("no panics while holding the lock")
            .bytes
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A number no earlier command of this process (or, practically, any
/// other) used: the clock's nanoseconds plus a counter, stepped by 2.
fn next_marker() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    1_000_000 + nanos + 2 * COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A `quetzal` process with piped stdio, killed (with everything it owns)
/// if the test ends early.
#[derive(Debug)]
pub struct Quetzal {
    child: Child,
    pub stdout: Transcript,
    pub stderr: Transcript,
}

impl Quetzal {
    /// Starts `binary args` with `QUETZAL_DATA_DIR=data`.
    pub fn spawn(binary: &Path, data: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(binary, data, args, &[])
    }

    /// [`Quetzal::spawn`] with more environment variables.
    pub fn spawn_with_env(binary: &Path, data: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .env("QUETZAL_DATA_DIR", data)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("quetzal starts");
        let stdout = Transcript::read_from(child.stdout.take().expect("piped"));
        let stderr = Transcript::read_from(child.stderr.take().expect("piped"));
        Quetzal {
            child,
            stdout,
            stderr,
        }
    }

    /// Types a line on the console.
    pub fn send_line(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// Sends bytes to the process's stdin as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(bytes).expect("quetzal reads its stdin");
        stdin.flush().expect("quetzal reads its stdin");
    }

    /// Waits for the shell prompt printed after byte `from`, to its end:
    /// busybox's line editor prints `tiny:/# ` and then asks the terminal
    /// where its cursor is. A guest paused or snapshotted between the two
    /// (a test that snapshots right after a command) would otherwise be
    /// caught mid-prompt, and its console log end without a whole prompt.
    pub fn wait_prompt_after(&self, from: usize) -> usize {
        self.stdout.wait_for_after(from, PROMPT, GUEST_TIMEOUT)
    }

    /// Types `command` and returns its output, with carriage returns
    /// removed. The output is framed by markers the shell computes
    /// (`$((N-1+1))`), so neither the echo of the typed line, however the
    /// line editor wraps it, nor earlier output (console history) matches
    /// them: N is new for every command.
    pub fn command(&mut self, command: &str) -> String {
        let n = next_marker();
        let (begin, end_marker) = (format!("<<{n}>>"), format!("<<{}>>", n + 1));
        let from = self.stdout.len();
        self.send_line(&format!(
            "echo '<<'$(({} + 1))'>>'; {command}; echo '<<'$(({n} + 1))'>>'",
            n - 1
        ));
        let start = self.stdout.wait_for_after(from, &begin, GUEST_TIMEOUT);
        let end = self
            .stdout
            .wait_for_after(start, &end_marker, GUEST_TIMEOUT);
        self.wait_prompt_after(end);
        let text = self.stdout.text();
        text[start..end - end_marker.len()]
            .replace('\r', "")
            .trim_matches('\n')
            .to_owned()
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid works") {
                // What it wrote last may still be in the pipes.
                self.stdout.wait_ended(Duration::from_secs(5));
                self.stderr.wait_ended(Duration::from_secs(5));
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "quetzal did not exit; stdout:\n{}\nstderr:\n{}",
                self.stdout.text(),
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the quetzal process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.child.id()).expect("pids fit in i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("quetzal is ours");
    }
}

impl Drop for Quetzal {
    fn drop(&mut self) {
        // A foreground VM dies with its quetzal (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && find(&cmdline, needle.as_bytes()).is_some()
        })
        .collect()
}

/// Waits (up to [`GUEST_TIMEOUT`]) until `check` holds; panics naming
/// `what` when it never does.
pub fn wait_until(what: &str, check: impl FnMut() -> bool) {
    wait_until_for(what, GUEST_TIMEOUT, check);
}

/// [`wait_until`] with its own deadline.
pub fn wait_until_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until no live process mentions `needle` (an orphan may take a
/// moment to die), then asserts so.
pub fn assert_no_process_mentions(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !processes_mentioning(needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_mentioning(needle),
        Vec::<u32>::new(),
        "processes still running for {needle}"
    );
}

/// Runs the browser script `web/tests/SCRIPT` (node, Debian's Chromium)
/// against `daemon`'s HTTPS listener, logged in with the first admin
/// token, with `env` added; panics with its output and the daemon's last
/// log lines unless it exits 0 and prints `NAME: all passed` (`NAME`: the
/// script's name without `.mjs`). Returns its stdout.
pub fn browser_script(daemon: &Daemon, script: &str, env: &[(&str, &str)]) -> String {
    let url = format!(
        "https://{}",
        daemon.tcp_addr().expect("started with --listen")
    );
    let cert = daemon.data.path().join("tls/node.crt");
    let token = std::fs::read_to_string(daemon.data.path().join("token")).expect("the admin token");
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    let run = Command::new("node")
        .arg(format!("tests/{script}"))
        .current_dir(&web)
        .env("QUETZAL_URL", &url)
        .env("QUETZAL_TOKEN", token.trim())
        // The browser pins the node certificate's key; node's own fetch
        // trusts the certificate as a CA, as `curl --cacert` would.
        .env("QUETZAL_CERT", &cert)
        .env("NODE_EXTRA_CA_CERTS", &cert)
        .env("SCREENSHOTS", tests_root().join("screenshots"))
        .envs(env.iter().copied())
        .output()
        .expect("node runs (scripts/setup installs it)");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let log = daemon.stderr.text();
    let start = (log.len().saturating_sub(4096)..log.len())
        .find(|at| log.is_char_boundary(*at))
        .unwrap_or(0);
    let passed = format!("{}: all passed", script.trim_end_matches(".mjs"));
    assert!(
        run.status.success() && stdout.contains(&passed),
        "the browser test {script} failed:\n{stdout}\n{stderr}\nquetzald's log ends:\n{}",
        &log[start..]
    );
    stdout
}

/// A real quetzald on a temporary data directory. Dropping it kills the
/// daemon and every QEMU it left running (VMs outlive their daemon by
/// design).
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    binary: PathBuf,
    pub data: DataDir,
    pub stderr: Transcript,
    listen: Option<String>,
}

impl Daemon {
    /// Starts `quetzald` (the binary at `binary`) on a new data directory.
    pub fn start(binary: &Path) -> Self {
        Self::start_in(binary, DataDir::new(), None)
    }

    /// Starts `quetzald` on `data`, also on TCP `listen` when given.
    pub fn start_in(binary: &Path, data: DataDir, listen: Option<&str>) -> Self {
        Self::start_with(binary, data, listen, "", &[])
    }

    /// Starts `quetzald` on a new data directory with `args` added.
    pub fn start_args(binary: &Path, args: &[&str]) -> Self {
        Self::start_with(binary, DataDir::new(), None, "", args)
    }

    /// Starts a `quetzald` with fault injection armed: `failpoints` as
    /// its `FAILPOINTS` (`name=return;other=return`).
    pub fn start_armed(binary: &Path, data: DataDir, failpoints: &str) -> Self {
        Self::start_with(binary, data, None, failpoints, &[])
    }

    fn start_with(
        binary: &Path,
        data: DataDir,
        listen: Option<&str>,
        failpoints: &str,
        args: &[&str],
    ) -> Self {
        let mut command = Command::new(binary);
        if !failpoints.is_empty() {
            command.env("FAILPOINTS", failpoints);
        }
        // --data-dir puts the directory in the command line, where
        // scripts/test looks for processes a test left behind.
        command
            .arg("--data-dir")
            .arg(data.path())
            .env("QUETZAL_DATA_DIR", data.path())
            .env("QUETZAL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(listen) = listen {
            command.args(["--listen", listen]);
        }
        command.args(args);
        let mut child = command.spawn().expect("quetzald starts");
        let stderr = Transcript::read_from(child.stderr.take().expect("piped"));
        // Owned from here on, so a panic below still kills it.
        let mut daemon = Daemon {
            child,
            binary: binary.to_owned(),
            data,
            stderr: stderr.clone(),
            listen: None,
        };
        let mut ready = stderr.wait_for_after(0, "quetzald serving", Duration::from_secs(30));
        if listen.is_some() {
            ready = stderr.wait_for_after(ready, "serving HTTPS on TCP", Duration::from_secs(30));
            ready = stderr.wait_for_after(ready, "\n", Duration::from_secs(30));
        }
        daemon.listen = listen.map(|_| {
            let text = stderr.text();
            let line = text[..ready].lines().last().expect("the TCP line");
            let addr = line.split("addr=").nth(1).expect("the address field");
            addr.split_whitespace()
                .next()
                .expect("an address")
                .to_owned()
        });
        daemon
    }

    /// The TCP address it serves (from `--listen`, port 0 resolved).
    pub fn tcp_addr(&self) -> Option<&str> {
        self.listen.as_deref()
    }

    pub fn socket(&self) -> PathBuf {
        self.data.path().join("quetzald.sock")
    }

    /// The SHA-256 fingerprint of the node certificate it made.
    pub fn fingerprint(&self) -> String {
        quetzal_node::tls::fingerprint_of_file(&self.data.path().join("tls/node.crt"))
            .expect("the daemon made its certificate")
    }

    /// A TLS connection to its HTTPS listener that trusts the node
    /// certificate (by its fingerprint) and nothing else.
    pub fn https(&self) -> Https {
        https(
            self.tcp_addr().expect("started with --listen"),
            &self.fingerprint(),
        )
    }

    /// `kill -9` the daemon (its VMs keep running).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the daemon to end by itself (an armed fail point killed
    /// it) and says how it ended.
    pub fn wait_for_death(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("quetzald is our child")
    }

    /// Kills the daemon and its VMs and hands back the data directory.
    pub fn stop(mut self) -> DataDir {
        self.kill_all();
        std::mem::take(&mut self.data)
    }

    /// Kills this daemon and starts a new one on the same data directory.
    pub fn restart(mut self, binary: &Path) -> Self {
        self.kill();
        let data = std::mem::take(&mut self.data);
        let listen = self.listen.clone();
        drop(self);
        Self::start_in(binary, data, listen.as_deref())
    }

    /// One HTTP/1.1 request on the Unix socket: (status, body).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let stream =
            std::os::unix::net::UnixStream::connect(self.socket()).expect("quetzald listens");
        http(stream, method, path, body, &[])
    }

    /// [`Daemon::request`] with the answer's head: (status, head, body).
    pub fn request_with_head(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let stream =
            std::os::unix::net::UnixStream::connect(self.socket()).expect("quetzald listens");
        http_with_head(stream, method, path, body, &[])
    }
}

/// A TLS stream to quetzald's HTTPS listener.
pub type Https = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection to `addr` that trusts only the certificate with
/// `fingerprint`.
pub fn https(addr: &str, fingerprint: &str) -> Https {
    let (_, config) = quetzal_node::tls::pinned_client(Some(fingerprint.to_owned()));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("a TLS client");
    let tcp = std::net::TcpStream::connect(addr).expect("quetzald listens on TCP");
    rustls::StreamOwned::new(connection, tcp)
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole
/// answer: (status, body). Chunked bodies are decoded.
pub fn http(
    stream: impl Read + std::io::Write,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, _, body) = http_with_head(stream, method, path, body, headers);
    (status, body)
}

/// [`http`], with the answer's head (status line and headers) too.
pub fn http_with_head(
    mut stream: impl Read + std::io::Write,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream
        .write_all(request.as_bytes())
        .expect("the daemon reads requests");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the daemon answers");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .expect("an HTTP answer has a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    out
}

impl Daemon {
    fn kill_all(&mut self) {
        self.kill();
        for pid in processes_mentioning(&self.data.path().display().to_string()) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Its networks stay up when it stops (running VMs keep them); a
        // test removes them, as an uninstall would.
        let removed = Command::new(&self.binary)
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--remove-networks")
            .output()
            .expect("quetzald runs");
        if !std::thread::panicking() {
            assert!(
                removed.status.success(),
                "quetzald --remove-networks: {}",
                String::from_utf8_lossy(&removed.stderr)
            );
            assert_no_process_mentions(&self.data.path().display().to_string());
        }
        remove_cgroups(self.data.path());
    }
}

/// Removes the cgroups of the VMs of data directory `data` (their QEMUs
/// were killed; a killed process may take a moment to leave its cgroup).
pub fn remove_cgroups(data: &Path) {
    quetzal_engine::qemu::sandbox::cgroup::remove_all_blocking(&data.join("vms"));
    // And their RAM files (on tmpfs: memory until removed).
    let _ = std::fs::remove_dir_all(quetzal_engine::spec::ram_dir(data));
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The `quetzal` CLI against one data directory.
#[derive(Clone, Debug)]
pub struct Cli {
    binary: PathBuf,
    data: PathBuf,
}

impl Cli {
    pub fn new(binary: &Path, data: &Path) -> Self {
        Cli {
            binary: binary.to_owned(),
            data: data.to_owned(),
        }
    }

    pub fn output(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.binary)
            .args(args)
            .env("QUETZAL_DATA_DIR", &self.data)
            .output()
            .expect("quetzal runs")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "quetzal {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("quetzal prints UTF-8")
    }

    /// Runs and expects failure with one line on stderr containing `expected`.
    pub fn fails(&self, args: &[&str], expected: &str) {
        let output = self.output(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "quetzal {args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?}: {stderr}");
    }

    /// Types `command` into a daemon VM's shell (through `quetzal vm
    /// console`, once its console log ends at a prompt) and returns the
    /// output.
    pub fn in_guest(&self, vm: &str, command: &str) -> String {
        let log = self.data.join(format!("vms/{vm}/console.log"));
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if at_prompt(&text) {
                break;
            }
            if Instant::now() > deadline {
                let tail: String = text
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("no shell on {vm}; its console ends with {tail:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut console = Quetzal::spawn(&self.binary, &self.data, &["vm", "console", vm]);
        console.command(command)
    }
}

/// Whether a tiny console's output ends at its shell prompt: [`PROMPT`],
/// the line editor's cursor query after `tiny:/# `, also with a stray ESC
/// between the two (seen once after a console client left mid-query; the
/// editor ignores a lone ESC, so the shell still reads the next line).
fn at_prompt(text: &str) -> bool {
    let Some(before_query) = text.strip_suffix("\u{1b}[6n") else {
        return false;
    };
    before_query
        .trim_end_matches('\u{1b}')
        .ends_with(PROMPT.trim_end_matches("\u{1b}[6n"))
}

/// Whether a VM's `guest_memory` (as `vm show --output json` has it) came
/// from `source` and is within 5% of what the guest's own `/proc/meminfo`
/// says: `MemTotal`, and `MemTotal - MemAvailable` used.
pub fn guest_memory_matches(ours: &serde_json::Value, source: &str, meminfo: &str) -> bool {
    let field = |name: &str| -> Option<f64> {
        let line = meminfo.lines().find(|line| line.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
    };
    let (Some(total), Some(available)) = (field("MemTotal:"), field("MemAvailable:")) else {
        return false;
    };
    let near = |key: &str, theirs: f64| {
        ours[key]
            .as_f64()
            .is_some_and(|ours| (ours - theirs).abs() <= theirs * 0.05)
    };
    ours["source"] == source && near("total_bytes", total) && near("used_bytes", total - available)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_is_found_also_with_a_stray_escape_before_its_cursor_query() {
        assert!(at_prompt("calm\r\ntiny:/# \u{1b}[6n"));
        assert!(at_prompt("flooded\r\ntiny:/# \u{1b}\u{1b}[6n"));
        assert!(!at_prompt("tiny:/# "));
        assert!(!at_prompt("tiny:/# echo hi\u{1b}[6n"));
    }
}
