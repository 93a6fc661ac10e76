//! The dashboard in a real browser: starts a real quetzald with its TCP
//! listener, then runs web/tests/dashboard.mjs (playwright-core driving
//! Debian's Chromium) against it. Screenshots of each page land in
//! target/quetzal-tests/screenshots.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use quetzal_testkit::{Daemon, DataDir, browser_script};

const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let stdout = browser_script(&daemon, "dashboard.mjs", &[]);
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
