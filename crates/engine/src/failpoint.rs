//! Fault injection for the tests, built only with the `failpoints`
//! feature (the end-to-end tests' daemon has it; a release build has
//! none of this). `FAILPOINTS=name=return` in the daemon's environment
//! arms the named point.

/// Arms the points named in `FAILPOINTS`.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        // Armed for the life of the process.
        std::mem::forget(scenario);
    }
}

/// When armed, the process dies here at once, as under `kill -9`: no
/// destructor runs, nothing is flushed.
pub fn crash(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        tracing::warn!(failpoint = name, "crashing here, as asked");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// When armed, waits here until `done` says so (a copy held until it is
/// cancelled).
pub fn stall_until(name: &str, done: impl Fn() -> bool) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        while !done() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (name, done);
}

/// When armed, holds the caller here until the file `release` exists (a
/// test holds a long operation open while it checks what still works,
/// then lets it finish).
pub async fn hold_until_file(name: &str, release: &std::path::Path) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        tracing::warn!(failpoint = name, release = %release.display(), "holding here until released");
        while !release.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (name, release);
}
