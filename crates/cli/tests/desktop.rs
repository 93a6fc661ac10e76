//! The desktop image end to end: a VM of it boots to Xfce, logged in on
//! its screen, and the dashboard's Screen tab in a real browser
//! (web/tests/desktop.mjs, Debian's Chromium) shows that desktop, not a
//! text console; its full-window page (web/tests/desktop-page.mjs) gives
//! the guest's screen the window's size and follows it, types with the
//! guest's layout, and shares the clipboard both ways; then its kernel hangs without saying so, and the
//! i6300esb watchdog systemd feeds resets it (issue 11's last item: the
//! cloud kernel of `debian` has no driver for the device).

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::path::Path;

use quetzal_testkit::{
    Cli, DEBIAN_TIMEOUT, Daemon, DataDir, browser_script, desktop, wait_until_for,
};

const QUETZAL: &str = env!("CARGO_BIN_EXE_quetzal");
const QUETZALD: &str = env!("CARGO_BIN_EXE_quetzald");

/// Whether `command` exits 0 in the guest (false too while it has no
/// agent yet).
fn succeeds(cli: &Cli, vm: &str, command: &str) -> bool {
    cli.output(&["vm", "exec", vm, "--", "sh", "-c", command])
        .status
        .success()
}

/// The number of times quetzald's events say `what`.
fn events_saying(cli: &Cli, what: &str) -> usize {
    cli.ok(&["events"]).matches(what).count()
}

#[test]
fn the_desktop_shows_in_the_screen_tab_and_its_watchdog_resets_a_hung_kernel() {
    desktop();
    let daemon = Daemon::start_in(Path::new(QUETZALD), DataDir::new(), Some("127.0.0.1:0"));
    let cli = Cli::new(Path::new(QUETZAL), daemon.data.path());
    cli.ok(&[
        "vm",
        "create",
        "desk",
        "--image",
        "desktop",
        "--memory",
        "1024",
        "--network",
        "default",
    ]);
    cli.ok(&["vm", "start", "desk"]);
    // Xfce's desktop runs in the default user's session on the screen.
    wait_until_for("the desktop session", DEBIAN_TIMEOUT, || {
        succeeds(&cli, "desk", "pgrep -u debian -x xfdesktop")
    });

    // An absolute pointer (the USB tablet), compressed swap in RAM in
    // front of a swap file.
    assert!(succeeds(
        &cli,
        "desk",
        "grep -q 'USB Tablet' /proc/bus/input/devices"
    ));
    assert!(succeeds(
        &cli,
        "desk",
        "grep -qx Y /sys/module/zswap/parameters/enabled && grep -q /swapfile /proc/swaps"
    ));

    let stdout = browser_script(&daemon, "desktop.mjs", &[("QUETZAL_VM", "desk")]);
    println!("{stdout}");

    // The full-window page (web/tests/desktop-page.mjs) types, pastes and
    // copies in a maximized terminal, which pastes a line without asking
    // (its unsafe-paste dialog off).
    assert!(succeeds(
        &cli,
        "desk",
        "mkdir -p ~debian/.config/xfce4/terminal && \
         printf '[Configuration]\\nMiscShowUnsafePasteDialog=FALSE\\n' \
           > ~debian/.config/xfce4/terminal/terminalrc && \
         chown -R debian: ~debian/.config/xfce4"
    ));
    cli.ok(&[
        "vm",
        "exec",
        "desk",
        "--",
        "systemd-run",
        "--uid=debian",
        "--setenv=DISPLAY=:0",
        "--setenv=XAUTHORITY=/home/debian/.Xauthority",
        "xfce4-terminal",
        "--disable-server",
        "--maximize",
    ]);
    wait_until_for("the terminal's window", DEBIAN_TIMEOUT, || {
        succeeds(
            &cli,
            "desk",
            "runuser -u debian -- env DISPLAY=:0 XAUTHORITY=/home/debian/.Xauthority \
             xdotool search --onlyvisible --class xfce4-terminal",
        )
    });
    let stdout = browser_script(&daemon, "desktop-page.mjs", &[("QUETZAL_VM", "desk")]);
    println!("{stdout}");
    // What the browser typed and pasted, as the guest got it; what the
    // guest copied, also through the CLI.
    assert!(
        succeeds(&cli, "desk", "test -f /tmp/Typed_in_browser"),
        "no /tmp/Typed_in_browser: {}",
        cli.ok(&["vm", "exec", "desk", "--", "ls", "/tmp"])
    );
    assert_eq!(
        cli.ok(&["vm", "exec", "desk", "--", "cat", "/tmp/pasted"]),
        "pasted-from-browser\n"
    );
    assert!(
        cli.ok(&["vm", "clipboard", "desk"])
            .contains("\ncopied-42\n")
    );
    cli.ok(&["vm", "clipboard", "desk", "--set", "set by the CLI ✓"]);
    assert_eq!(cli.ok(&["vm", "clipboard", "desk"]), "set by the CLI ✓");

    // The kernel hangs: it panics with the pvpanic device told nothing
    // (its events turned off), so QEMU does not learn of it and the
    // guest sits in its panic, no longer feeding the watchdog.
    let fired = "its watchdog device fired";
    assert_eq!(events_saying(&cli, fired), 0);
    assert!(succeeds(
        &cli,
        "desk",
        "ls /dev/watchdog0 && grep -qi i6300esb /sys/class/watchdog/watchdog0/identity"
    ));
    let boot_id = || {
        cli.ok(&[
            "vm",
            "exec",
            "desk",
            "--",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    let boot_before = boot_id();
    cli.ok(&[
        "vm",
        "exec",
        "desk",
        "--",
        "systemd-run",
        "--no-block",
        "sh",
        "-c",
        "sleep 1; for f in /sys/bus/*/drivers/pvpanic*/*/events; do echo 0 > $f; done; \
         echo c > /proc/sysrq-trigger",
    ]);
    wait_until_for("the watchdog's reset", DEBIAN_TIMEOUT, || {
        events_saying(&cli, fired) == 1
    });
    // It boots again: a new boot, the desktop back.
    wait_until_for("the desktop after the reset", DEBIAN_TIMEOUT, || {
        succeeds(&cli, "desk", "pgrep -u debian -x xfdesktop")
    });
    assert_ne!(boot_id(), boot_before);
    assert!(cli.ok(&["vm", "show", "desk"]).contains("running"));
    cli.ok(&["vm", "stop", "desk", "--force"]);
    cli.ok(&["vm", "rm", "desk"]);
}
