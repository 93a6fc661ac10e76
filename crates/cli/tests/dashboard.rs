//! The dashboard in a real browser: starts a real quetzald with its TCP
//! listener, then runs web/tests/dashboard.mjs (playwright-core driving
//! Debian's Chromium) against it. Screenshots of each page land in
//! target/quetzal-tests/screenshots.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;
use std::process::Command;

use quetzal_testkit::{Cli, Daemon, DataDir, tests_root};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let url = format!("https://{}", daemon.tcp_addr().unwrap());
    let cert = daemon.data.path().join("tls/node.crt");
    let token = Cli::new(Path::new(QUETZAL), daemon.data.path()).ok(&["token"]);
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");

    let run = Command::new("node")
        .arg("tests/dashboard.mjs")
        .current_dir(&web)
        .env("QUETZAL_URL", &url)
        .env("QUETZAL_TOKEN", token.trim())
        // The browser pins the node certificate's key; node's own fetch
        // trusts the certificate as a CA, as `curl --cacert` would.
        .env("QUETZAL_CERT", &cert)
        .env("NODE_EXTRA_CA_CERTS", &cert)
        .env("SCREENSHOTS", tests_root().join("screenshots"))
        .output()
        .expect("node runs (scripts/setup installs it)");

    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // On failure, what quetzald logged too (its last 4 KB).
    let log = daemon.stderr.text();
    let start = (log.len().saturating_sub(4096)..log.len())
        .find(|at| log.is_char_boundary(*at))
        .unwrap_or(0);
    let log = &log[start..];
    assert!(
        run.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\nquetzald's log ends:\n{log}"
    );
    assert!(stdout.contains("dashboard: all passed"), "{stdout}");
    println!("{stdout}");
}

#[test]
fn the_dashboard_page_is_served_without_credentials_and_the_api_is_not() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let get = |path: &str| quetzal_testkit::http(daemon.https(), "GET", path, None, &[]);
    let (status, page) = get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<div id=\"app\">"), "{page}");
    let script = page
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let (status, _) = get(&script);
    assert_eq!(status, 200, "{script}");
    let (status, body) = get("/api/v1/vms");
    assert_eq!(status, 401);
    assert!(body.contains("\"unauthorized\""), "{body}");
    let (status, body) = quetzal_testkit::http(
        daemon.https(),
        "POST",
        "/api/v1/session",
        Some(r#"{"token":"wrong"}"#),
        &[],
    );
    assert_eq!(status, 401, "{body}");
}
