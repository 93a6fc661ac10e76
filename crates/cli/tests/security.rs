//! The TCP listener's security, end to end against a real quetzald: HTTPS
//! (curl trusting the node certificate, the CLI pinning its fingerprint,
//! plain HTTP refused), every route of the router walked with no
//! credentials and with each role, tokens made, used and revoked,
//! sessions that outlive a restart, and the audit log.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use quetzal_api::Role;
use quetzal_node::http::guard::Access;
use quetzal_testkit::{Daemon, DataDir, http, http_with_head};
use serde_json::Value;

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

fn https_daemon() -> Daemon {
    Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"))
}

fn quetzal(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(QUETZAL)
        .args(args)
        .env("QUETZAL_DATA_DIR", daemon.data.path())
        .env_remove("QUETZAL_URL")
        .output()
        .unwrap()
}

/// `quetzal token create NAME --role ROLE`: the secret is the last line.
fn token(daemon: &Daemon, name: &str, role: &str) -> String {
    let made = quetzal(daemon, &["token", "create", name, "--role", role]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let stdout = String::from_utf8(made.stdout).unwrap();
    stdout.lines().last().unwrap().to_owned()
}

fn admin(daemon: &Daemon) -> String {
    std::fs::read_to_string(daemon.data.path().join("token"))
        .unwrap()
        .trim()
        .to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_is_served_with_the_node_certificate_and_plain_http_gets_no_data() {
    let daemon = https_daemon();
    let addr = daemon.tcp_addr().unwrap().to_owned();
    let cert = daemon.data.path().join("tls/node.crt");
    let cert = cert.to_str().unwrap();
    let auth = format!("Authorization: {}", bearer(&admin(&daemon)));

    let (listed, err) = curl(&[
        "--cacert",
        cert,
        "-H",
        &auth,
        &format!("https://{addr}/api/v1/vms"),
    ]);
    assert_eq!(listed, "[]", "{err}");
    // By name too: the certificate names localhost.
    let port = addr.rsplit_once(':').unwrap().1;
    let (listed, err) = curl(&[
        "--cacert",
        cert,
        "-H",
        &auth,
        &format!("https://localhost:{port}/api/v1/vms"),
    ]);
    assert_eq!(listed, "[]", "{err}");
    let (anonymous, _) = curl(&["--cacert", cert, &format!("https://{addr}/api/v1/vms")]);
    assert!(
        anonymous.contains(r#""code":"unauthorized""#),
        "{anonymous}"
    );
    // Without the certificate, curl does not trust it.
    let (_, untrusted) = curl(&["-H", &auth, &format!("https://{addr}/api/v1/vms")]);
    assert!(untrusted.contains("certificate"), "{untrusted}");

    // Plain HTTP, even with the token: a refusal that says where to go.
    let plain = http(
        std::net::TcpStream::connect(&addr).unwrap(),
        "GET",
        "/api/v1/vms",
        None,
        &[("Authorization", &bearer(&admin(&daemon)))],
    );
    assert_eq!(plain.0, 400);
    assert!(plain.1.contains(&format!("https://{addr}/")), "{}", plain.1);
    assert!(
        !plain.1.contains('['),
        "no data over plain HTTP: {}",
        plain.1
    );

    // The private key and certificate are the daemon's alone.
    for file in ["node.key", "node.crt"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(daemon.data.path().join("tls").join(file))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn the_cli_trusts_a_server_by_its_pinned_fingerprint_only() {
    let daemon = https_daemon();
    let url = format!("https://{}", daemon.tcp_addr().unwrap());
    let config = DataDir::empty();
    let remote = |fingerprint: Option<&str>| {
        let mut command = Command::new(QUETZAL);
        command
            .args(["vm", "list", "--output", "json"])
            .env("QUETZAL_DATA_DIR", daemon.data.path())
            .env("QUETZAL_URL", &url)
            .env("QUETZAL_CONFIG_DIR", config.path())
            .stdin(std::process::Stdio::null());
        if let Some(fingerprint) = fingerprint {
            command.args(["--fingerprint", fingerprint]);
        }
        command.output().unwrap()
    };

    // `quetzal token` says which fingerprint to pin.
    let told = quetzal(&daemon, &["token"]);
    let told = String::from_utf8(told.stderr).unwrap();
    let fingerprint = daemon.fingerprint();
    assert!(told.contains(&fingerprint), "{told}");

    let unknown = remote(None);
    let stderr = String::from_utf8(unknown.stderr).unwrap();
    assert!(!unknown.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not trusted yet"), "{stderr}");
    assert!(
        stderr.contains(&format!("--fingerprint {fingerprint}")),
        "{stderr}"
    );

    let pinned = remote(Some(&fingerprint));
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    assert_eq!(String::from_utf8(pinned.stdout).unwrap().trim(), "[]");

    // As other tools print it (upper case, colons) is the same pin.
    let colons: Vec<String> = fingerprint
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8(pair.to_vec()).unwrap().to_uppercase())
        .collect();
    assert!(remote(Some(&colons.join(":"))).status.success());

    let wrong = remote(Some(&"ab".repeat(32)));
    let stderr = String::from_utf8(wrong.stderr).unwrap();
    assert!(!wrong.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "refusing quetzald at {}",
            daemon.tcp_addr().unwrap()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("fingerprint is {fingerprint}")),
        "{stderr}"
    );

    // A pin remembered in the servers file (what a yes at the prompt keeps).
    std::fs::write(
        config.path().join("servers"),
        format!("{} {fingerprint}\n", daemon.tcp_addr().unwrap()),
    )
    .unwrap();
    assert!(remote(None).status.success());
}

/// One request's status (its head only: event streams never end).
fn status(daemon: &Daemon, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut stream = daemon.https();
    let body = if matches!(method, "POST" | "PUT" | "PATCH") {
        "{}"
    } else {
        ""
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the answer's head ends");
        head.push(byte[0]);
    }
    String::from_utf8(head)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_route_answers_each_role_as_its_access_says() {
    let daemon = https_daemon();
    // What the reads name exists: a running VM, a template, a network, an
    // operation.
    for vm in ["walk", "walk-base"] {
        let (code, body) = daemon.request(
            "POST",
            "/api/v1/vms",
            Some(&format!(r#"{{"name":"{vm}"}}"#)),
        );
        assert_eq!(code, 201, "{body}");
    }
    let (code, body) = daemon.request(
        "POST",
        "/api/v1/templates",
        Some(r#"{"name":"walkt","from_vm":"walk-base"}"#),
    );
    assert_eq!(code, 202, "{body}");
    let op: Value = serde_json::from_str(&body).unwrap();
    let op = op["operation"]["id"].as_str().unwrap().to_owned();
    let (code, body) = daemon.request("GET", &format!("/api/v1/operations/{op}/wait"), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""state":"succeeded""#), "{body}");
    // A pool of it (no spares: nothing is made) for the pool reads.
    let (code, body) = daemon.request(
        "POST",
        "/api/v1/pools",
        Some(r#"{"name":"walkp","template":"walkt","spare":0,"max":1}"#),
    );
    assert_eq!(code, 201, "{body}");
    // Running: its stats, console and screen are there to read.
    let (code, body) = daemon.request("POST", "/api/v1/vms/walk/start", None);
    assert_eq!(code, 200, "{body}");
    let (code, index) = daemon.request("GET", "/", None);
    assert_eq!(code, 200);
    let asset = index
        .split("src=\"/assets/")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let tokens = [
        (Role::Viewer, token(&daemon, "walk-viewer", "viewer")),
        (Role::Operator, token(&daemon, "walk-operator", "operator")),
        (Role::Admin, token(&daemon, "walk-admin", "admin")),
    ];

    let routes = quetzal_node::http::routes();
    assert!(routes.len() > 40, "the whole router: {}", routes.len());
    let mut checked = 0;
    for route in &routes {
        let method = route.method.as_str();
        let read = method == "GET";
        let websocket = route.path.ends_with("/console") || route.path.ends_with("/vnc");
        // Reads name what exists; changes name what does not, so that an
        // allowed one is answered by its handler (4xx) and changes nothing.
        let path = route
            .path
            .replace(
                "/vms/{name}",
                if read { "/vms/walk" } else { "/vms/absent" },
            )
            .replace(
                "/templates/{name}",
                if read {
                    "/templates/walkt"
                } else {
                    "/templates/absent"
                },
            )
            .replace(
                "/networks/{name}",
                if read {
                    "/networks/default"
                } else {
                    "/networks/absent"
                },
            )
            .replace(
                "/pools/{name}",
                if read {
                    "/pools/walkp"
                } else {
                    "/pools/absent"
                },
            )
            .replace("{vm}", "absent")
            .replace("/tokens/{name}", "/tokens/absent")
            .replace("{snapshot}", "absent")
            .replace("{action}", "absent-action")
            .replace("{id}", if read { &op } else { "absent" })
            .replace("{*path}", &asset);
        let mut headers = vec![];
        if websocket {
            headers.extend([
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ]);
        }
        let what = format!("{method} {path}");

        let anonymous = status(&daemon, method, &path, &headers);
        match route.access {
            Access::Open => assert_ne!(anonymous, 401, "{what} is open"),
            Access::Needs(_) => assert_eq!(anonymous, 401, "{what} without credentials"),
        }
        let wrong = bearer(&"0".repeat(64));
        let mut with_wrong = headers.clone();
        with_wrong.push(("Authorization", &wrong));
        if route.access != Access::Open {
            assert_eq!(
                status(&daemon, method, &path, &with_wrong),
                401,
                "{what} with an unknown token"
            );
        }

        for (role, secret) in &tokens {
            let auth = bearer(secret);
            let mut with_token = headers.clone();
            with_token.push(("Authorization", &auth));
            let answer = status(&daemon, method, &path, &with_token);
            let allowed = match route.access {
                Access::Open => true,
                Access::Needs(needed) => *role >= needed,
            };
            if allowed {
                assert!(answer != 401 && answer != 403, "{what} as {role}: {answer}");
                if *role == Role::Viewer && read {
                    assert_eq!(answer, 200, "{what} is a read the viewer may do");
                }
            } else {
                assert_eq!(answer, 403, "{what} as {role}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, routes.len());

    // The roles are what docs/security.md says: a viewer only reads and
    // opens no console and no guest file; an operator neither manages
    // tokens, networks nor images, nor reads the audit log.
    for route in &routes {
        let Access::Needs(needed) = route.access else {
            continue;
        };
        let admin_only = route.path.starts_with("/api/v1/tokens")
            || route.path.starts_with("/api/v1/audit")
            || (route.path.starts_with("/api/v1/networks") && route.method != "GET")
            || (route.path.starts_with("/api/v1/images") && route.method != "GET");
        // Consoles, screens, guest files and clipboards hand over the
        // guest itself.
        let console = route.path.ends_with("/console")
            || route.path.ends_with("/vnc")
            || route.path.ends_with("/files")
            || route.path.ends_with("/clipboard");
        let expected = if admin_only {
            Role::Admin
        } else if console || route.method != "GET" {
            Role::Operator
        } else {
            Role::Viewer
        };
        assert_eq!(needed, expected, "{} {}", route.method, route.path);
    }
}

#[test]
fn a_token_works_until_revoked_and_bad_ones_get_one_clear_line() {
    let daemon = https_daemon();
    let secret = token(&daemon, "ci", "operator");
    let list = |token: &str| {
        http(
            daemon.https(),
            "GET",
            "/api/v1/vms",
            None,
            &[("Authorization", &bearer(token))],
        )
    };

    assert_eq!(secret.len(), 64);
    assert_eq!(list(&secret), (200, "[]".to_owned()));

    let listed = quetzal(&daemon, &["token", "list", "--output", "json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let ci = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap();
    assert_eq!(ci["role"], "operator");
    assert!(ci["last_used_at"].is_i64(), "{ci}");
    assert!(
        !listed.to_string().contains(&secret),
        "a list never shows a secret"
    );
    let human = String::from_utf8(quetzal(&daemon, &["token", "list"]).stdout).unwrap();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("ci ") && l.contains("operator")),
        "{human}"
    );

    for (args, says) in [
        (
            vec!["token", "create", "ci", "--role", "viewer"],
            "a token named ci exists already",
        ),
        (
            vec!["token", "create", "x", "--role", "root"],
            "unknown role 'root'",
        ),
        (
            vec!["token", "create", "bad name", "--role", "viewer"],
            "invalid token name",
        ),
        (
            vec!["token", "create", "y", "--role", "viewer", "--expires", "0"],
            "expires_days must be 1 to 3650",
        ),
        (vec!["token", "revoke", "nobody"], "no token named nobody"),
    ] {
        let out = quetzal(&daemon, &args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    let revoked = quetzal(&daemon, &["token", "revoke", "ci"]);
    assert!(revoked.status.success());
    let after = list(&secret);
    assert_eq!(after.0, 401);
    assert!(after.1.contains("unknown or revoked token"), "{}", after.1);
    let malformed = list("not-a-token");
    assert_eq!(malformed.0, 401);
    assert!(malformed.1.contains("malformed"), "{}", malformed.1);
}

#[test]
fn a_dashboard_session_outlives_a_daemon_restart_and_ends_at_logout() {
    let daemon = https_daemon();
    let secret = token(&daemon, "desk", "viewer");
    let body = format!(r#"{{"token":"{secret}"}}"#);
    let (code, head, _) =
        http_with_head(daemon.https(), "POST", "/api/v1/session", Some(&body), &[]);
    assert_eq!(code, 204);
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap();
    assert!(cookie_line.contains("Secure"), "{cookie_line}");
    assert!(cookie_line.contains("HttpOnly"), "{cookie_line}");
    let cookie = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let stored = std::fs::read(daemon.data.path().join("quetzal.db")).unwrap();
    let value = cookie.split_once('=').unwrap().1;
    assert!(
        !stored.windows(value.len()).any(|w| w == value.as_bytes()),
        "the session is stored hashed"
    );

    let daemon = daemon.restart(Path::new(QUETZALD));
    let read = |daemon: &Daemon| {
        http(
            daemon.https(),
            "GET",
            "/api/v1/vms",
            None,
            &[("Cookie", &cookie)],
        )
    };
    assert_eq!(read(&daemon), (200, "[]".to_owned()));
    // The session has its token's role.
    let create = http(
        daemon.https(),
        "POST",
        "/api/v1/vms",
        Some(r#"{"name":"x"}"#),
        &[("Cookie", &cookie)],
    );
    assert_eq!(create.0, 403, "{}", create.1);

    let (code, _) = http(
        daemon.https(),
        "DELETE",
        "/api/v1/session",
        None,
        &[("Cookie", &cookie)],
    );
    assert_eq!(code, 204);
    let after = read(&daemon);
    assert_eq!(after.0, 401);
    assert!(after.1.contains("the session has ended"), "{}", after.1);
}

#[test]
fn the_audit_log_has_a_row_per_change_with_who_and_no_secret() {
    let daemon = https_daemon();
    let ops = token(&daemon, "ops", "operator");
    let viewer = token(&daemon, "peek", "viewer");
    let as_ops = [("Authorization", bearer(&ops))];
    let as_ops: Vec<(&str, &str)> = as_ops.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let created = http(
        daemon.https(),
        "POST",
        "/api/v1/vms",
        Some(r#"{"name":"audited"}"#),
        &as_ops,
    );
    assert_eq!(created.0, 201, "{}", created.1);
    let refused = http(
        daemon.https(),
        "POST",
        "/api/v1/vms/audited/start",
        None,
        &[("Authorization", &bearer(&viewer))],
    );
    assert_eq!(refused.0, 403);
    let login = format!(r#"{{"token":"{ops}"}}"#);
    assert_eq!(
        http(daemon.https(), "POST", "/api/v1/session", Some(&login), &[]).0,
        204
    );
    // Reads leave no row.
    for path in [
        "/api/v1/vms",
        "/api/v1/vms/audited",
        "/api/v1/events",
        "/api/v1/host",
    ] {
        assert_eq!(
            http(daemon.https(), "GET", path, None, &as_ops).0,
            200,
            "{path}"
        );
    }
    let deleted = http(
        daemon.https(),
        "DELETE",
        "/api/v1/vms/audited",
        None,
        &as_ops,
    );
    assert_eq!(deleted.0, 204, "{}", deleted.1);

    let out = quetzal(&daemon, &["audit", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    let seen: Vec<(String, String, String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["who"].as_str().unwrap().to_owned(),
                r["method"].as_str().unwrap().to_owned(),
                r["path"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let row = |who: &str, method: &str, path: &str, status: u64| {
        (who.to_owned(), method.to_owned(), path.to_owned(), status)
    };
    assert_eq!(
        seen,
        vec![
            row("local", "POST", "/api/v1/tokens", 201),
            row("local", "POST", "/api/v1/tokens", 201),
            row("ops", "POST", "/api/v1/vms", 201),
            row("peek", "POST", "/api/v1/vms/audited/start", 403),
            row("ops", "POST", "/api/v1/session", 204),
            row("ops", "DELETE", "/api/v1/vms/audited", 204),
        ]
    );
    assert!(
        rows.iter().skip(2).all(|r| r["source"] == "127.0.0.1"),
        "{text}"
    );
    for secret in [&ops, &viewer, &admin(&daemon)] {
        assert!(!text.contains(secret.as_str()), "a secret in the audit log");
    }
    let stored = std::fs::read(daemon.data.path().join("quetzal.db")).unwrap();
    assert!(
        !stored.windows(64).any(|w| w == ops.as_bytes()),
        "a secret in the store"
    );

    // Only an admin reads it.
    let peek = http(
        daemon.https(),
        "GET",
        "/api/v1/audit",
        None,
        &[("Authorization", &bearer(&viewer))],
    );
    assert_eq!(peek.0, 403);
}

#[test]
fn a_bad_certificate_or_key_stops_the_daemon_with_one_line_before_it_listens() {
    // Two nodes' certificates: the first's with the second's key is a pair
    // that does not go together.
    let one = https_daemon();
    let two = https_daemon();
    let cert = one.data.path().join("tls/node.crt");
    let other_key = two.data.path().join("tls/node.key");
    let junk = two.data.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let missing = two.data.path().join("missing.pem");
    let data = DataDir::new();
    let start = |cert: &Path, key: &Path| {
        Command::new(QUETZALD)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .env("QUETZAL_LOG", "warn")
            .output()
            .unwrap()
    };

    for (cert, key, says) in [
        (&cert, &other_key, "do not go together"),
        (&junk, &other_key, "holds no PEM certificate"),
        (&cert, &junk, "holds no PEM private key"),
        (&missing, &other_key, "cannot read"),
    ] {
        let out = start(cert, key);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            !quetzal_node::socket_path(data.path()).exists(),
            "it served: {stderr}"
        );
    }
    // The key alone is not enough, nor a certificate without --listen.
    let half = Command::new(QUETZALD)
        .args(["--listen", "127.0.0.1:0", "--tls-key"])
        .arg(&other_key)
        .output()
        .unwrap();
    assert!(!half.status.success());
    assert_eq!(String::from_utf8(half.stderr).unwrap().lines().count(), 1);
}

#[test]
fn at_a_terminal_the_cli_asks_once_whether_to_trust_a_new_server() {
    let daemon = https_daemon();
    let config = DataDir::empty();
    // `script` gives the CLI a terminal; what is piped in is typed there.
    let at_terminal = |answer: &str| {
        let command = format!("{QUETZAL} vm list --output json; echo exit=$?",);
        let mut child = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("QUETZAL_DATA_DIR", daemon.data.path())
            .env(
                "QUETZAL_URL",
                format!("https://{}", daemon.tcp_addr().unwrap()),
            )
            .env("QUETZAL_CONFIG_DIR", config.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fingerprint = daemon.fingerprint();

    let declined = at_terminal("n\n");
    assert!(
        declined.contains(&format!("fingerprint is {fingerprint}")),
        "{declined}"
    );
    assert!(
        declined.contains("trust it from now on? [y/N]"),
        "{declined}"
    );
    assert!(
        declined.contains("its certificate was not trusted"),
        "{declined}"
    );
    assert!(declined.contains("exit=1"), "{declined}");
    assert!(!config.path().join("servers").exists());

    let accepted = at_terminal("y\n");
    assert!(accepted.contains("exit=0"), "{accepted}");
    let kept = std::fs::read_to_string(config.path().join("servers")).unwrap();
    assert_eq!(
        kept,
        format!("{} {fingerprint}\n", daemon.tcp_addr().unwrap())
    );
    // Asked once: from now on it is known, terminal or not.
    let again = at_terminal("");
    assert!(!again.contains("trust it"), "{again}");
    assert!(again.contains("exit=0"), "{again}");
}

#[test]
fn quetzal_audit_follow_prints_each_change_as_it_happens() {
    let daemon = https_daemon();
    let follow = quetzal_testkit::Quetzal::spawn(
        Path::new(QUETZAL),
        daemon.data.path(),
        &["audit", "--follow", "--output", "json"],
    );
    let ops = token(&daemon, "follow-me", "operator");
    follow.stdout.wait_for(r#""path":"/api/v1/tokens""#);

    let created = http(
        daemon.https(),
        "POST",
        "/api/v1/vms",
        Some(r#"{"name":"followed"}"#),
        &[("Authorization", &bearer(&ops))],
    );
    assert_eq!(created.0, 201, "{}", created.1);

    follow
        .stdout
        .wait_for(r#""who":"follow-me","source":"127.0.0.1","method":"POST","path":"/api/v1/vms","status":201"#);
}

#[test]
fn a_kept_alive_https_connection_stays_usable_after_idling() {
    let daemon = https_daemon();
    let mut stream = daemon.https();
    let request = format!(
        "GET /api/v1/host HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\r\n",
        bearer(&admin(&daemon))
    );
    let answer = |stream: &mut quetzal_testkit::Https| {
        stream.write_all(request.as_bytes()).unwrap();
        answer_on(stream).map_or_else(
            || String::from("closed"),
            |head| head.lines().next().unwrap().to_owned(),
        )
    };

    assert_eq!(answer(&mut stream), "HTTP/1.1 200 OK");
    // Idle past what a browser's connection pool waits (hyper's header
    // timer closed such connections after 30 s, and browsers' requests on
    // them failed): the idling is what is tested.
    std::thread::sleep(std::time::Duration::from_secs(35));
    assert_eq!(answer(&mut stream), "HTTP/1.1 200 OK");
}

/// Reads one answer (head and a `Content-Length` body) off a kept-alive
/// connection: its head, or none when the connection closed first.
fn answer_on(stream: &mut quetzal_testkit::Https) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let line = line.to_ascii_lowercase();
            line.strip_prefix("content-length: ")
                .map(|n| n.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    Some(head)
}

#[test]
fn an_answer_given_before_the_body_arrived_closes_its_kept_alive_connection() {
    let daemon = https_daemon();
    let auth = bearer(&admin(&daemon));
    let mut stream = daemon.https();
    stream
        .sock
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();

    // A request whose body came with its head is read whole: the
    // connection stays open for the next one.
    let body = r#"{"name":"one"}"#;
    write!(
        stream,
        "POST /api/v1/vms/none/snapshots HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let kept = answer_on(&mut stream).unwrap().to_ascii_lowercase();
    assert!(kept.starts_with("http/1.1 404"), "{kept}");
    assert!(!kept.contains("connection: close"), "{kept}");

    // The head of one whose body has not come yet, refused for its content
    // type without reading the body: the answer says the connection ends
    // (hyper cannot reuse it), so a client with a pool does not send its
    // next request into a closed connection.
    write!(
        stream,
        "POST /api/v1/vms/none/snapshots HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    let closing = answer_on(&mut stream).unwrap().to_ascii_lowercase();
    assert!(closing.starts_with("http/1.1 4"), "{closing}");
    assert!(closing.contains("connection: close"), "{closing}");
}
