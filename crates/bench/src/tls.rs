//! `quetzal-bench tls`: what HTTPS costs. One quetzald with 200 VMs
//! defined and `--listen`; `GET /api/v1/vms` over one kept-alive
//! connection on the Unix socket (plain HTTP: the reference) and over one
//! kept-alive HTTPS connection to the TCP listener, alternating in rounds
//! so both see the same machine; and, for scale, HTTPS with a new
//! connection (TCP + TLS handshake) per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::node::{Daemon, scratch_data};
use crate::stats::{millis, percentile};

const VMS: usize = 200;
const CALLS: usize = 500;

pub fn run(runs: usize, bin: &Path) -> anyhow::Result<()> {
    let (_scratch, data) = scratch_data()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let daemon = Daemon::start_with(&bin.join("quetzald"), &data, &["--listen", &addr])?;
    eprintln!("bench: defining {VMS} VMs");
    for i in 0..VMS {
        let body = format!(r#"{{"name": "tls-{i:03}", "memory_mib": 128}}"#);
        let (status, answer) = daemon.request("POST", "/api/v1/vms", Some(&body))?;
        if status != 201 {
            bail!("create: {status} {answer}");
        }
    }
    let token = std::fs::read_to_string(data.join("token"))?
        .trim()
        .to_owned();
    let fingerprint = quetzal_node::tls::fingerprint_of_file(&data.join("tls/node.crt"))?;
    let tls = |addr: &str| -> anyhow::Result<_> {
        let (_, config) = quetzal_node::tls::pinned_client(Some(fingerprint.clone()));
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
        let tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        Ok(rustls::StreamOwned::new(connection, tcp))
    };

    let mut unix_all = Vec::new();
    let mut tls_all = Vec::new();
    let mut fresh_all = Vec::new();
    let (mut unix_p50s, mut tls_p50s) = (Vec::new(), Vec::new());
    let auth = format!("Bearer {token}");
    for round in 0..runs {
        eprintln!("bench: round {}/{runs}: {CALLS} calls each", round + 1);
        let mut unix = Keep::new(UnixStream::connect(data.join("quetzald.sock"))?);
        let mut https = Keep::new(tls(&addr)?);
        let (mut u, mut t) = (Vec::new(), Vec::new());
        for _ in 0..CALLS {
            u.push(unix.get("/api/v1/vms", None)?);
            t.push(https.get("/api/v1/vms", Some(&auth))?);
        }
        for _ in 0..CALLS / 10 {
            let start = Instant::now();
            Keep::new(tls(&addr)?).get("/api/v1/vms", Some(&auth))?;
            fresh_all.push(start.elapsed());
        }
        unix_p50s.push(percentile(&u, 50));
        tls_p50s.push(percentile(&t, 50));
        unix_all.extend(u);
        tls_all.extend(t);
    }
    drop(daemon);

    let spread = |p50s: &[Duration]| {
        let min = p50s.iter().min().copied().unwrap_or_default();
        let max = p50s.iter().max().copied().unwrap_or_default();
        format!("{:.2}–{:.2}", millis(min), millis(max))
    };
    println!(
        "| `GET /api/v1/vms`, {VMS} VMs, kept-alive connection | p50 (per-round p50 min–max) | p99 |"
    );
    println!("|---|---|---|");
    println!(
        "| Unix socket, plain HTTP (reference) | {:.2} ms ({}) | {:.2} ms |",
        millis(percentile(&unix_all, 50)),
        spread(&unix_p50s),
        millis(percentile(&unix_all, 99))
    );
    println!(
        "| TCP listener, HTTPS | {:.2} ms ({}) | {:.2} ms |",
        millis(percentile(&tls_all, 50)),
        spread(&tls_p50s),
        millis(percentile(&tls_all, 99))
    );
    let added = percentile(&tls_all, 50).saturating_sub(percentile(&unix_all, 50));
    println!(
        "| **added by TLS (p50)** | **{:.3} ms** ({:.2}×) | — |",
        millis(added),
        crate::node::ratio(percentile(&tls_all, 50), percentile(&unix_all, 50))
    );
    println!(
        "| HTTPS, a new connection per request (TCP + TLS handshake) | {:.2} ms | {:.2} ms |",
        millis(percentile(&fresh_all, 50)),
        millis(percentile(&fresh_all, 99))
    );
    eprintln!(
        "bench: {runs} rounds of {CALLS} calls; {} fresh HTTPS connections",
        fresh_all.len()
    );
    Ok(())
}

/// HTTP/1.1 over one connection, kept alive.
struct Keep<S: Read + Write> {
    stream: BufReader<S>,
}

impl<S: Read + Write> Keep<S> {
    fn new(stream: S) -> Self {
        Keep {
            stream: BufReader::with_capacity(256 * 1024, stream),
        }
    }

    /// One GET; how long it took to the last byte of the answer.
    fn get(&mut self, path: &str, auth: Option<&str>) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        write!(
            self.stream.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n"
        )?;
        self.stream.get_mut().flush()?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("answered {line}");
        }
        let mut length = None;
        loop {
            line.clear();
            self.stream.read_line(&mut line)?;
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
        let length = length.context("a Content-Length")?;
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body)?;
        if length < 100 * VMS {
            bail!("a list of {length} bytes");
        }
        Ok(start.elapsed())
    }
}
