//! Every state transition of the QEMU engine against a real QEMU running the
//! real tiny guest, with the events each one produces.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use quetzal_engine::accel::{self, AccelProbe};
use quetzal_engine::spec::{
    Boot, Cpus, DirectBoot, Disk, DiskFormat, Machine, MemoryMib, VmName, VmSpec,
};
use quetzal_engine::{Engine, EngineVm, Lifetime, QemuEngine, QemuVm, VmEvent, VmState, disk};
use quetzal_testkit::{DataDir, GUEST_TIMEOUT, Transcript, assert_no_process_mentions, tiny};

struct Booted {
    vm: QemuVm,
    console: Transcript,
    keyboard: UnixStream,
}

impl Booted {
    fn type_line(&mut self, line: &str) {
        self.keyboard
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }
}

async fn next_event(vm: &mut QemuVm) -> VmEvent {
    tokio::time::timeout(GUEST_TIMEOUT, vm.next_event())
        .await
        .expect("an event in time")
}

/// The events up to and including the VM's exit.
async fn events_until_exit(vm: &mut QemuVm) -> Vec<VmEvent> {
    let mut events = Vec::new();
    loop {
        let event = next_event(vm).await;
        let done = matches!(event, VmEvent::Exited { .. });
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Creates the tiny VM, checks it is created but not running, attaches the
/// console, starts it and waits for the shell.
async fn boot(data: &DataDir) -> Booted {
    let image = tiny();
    let overlay = data.path().join("root.qcow2");
    disk::create_overlay(&image.root_disk(), DiskFormat::Qcow2, &overlay).unwrap();
    let spec = VmSpec {
        name: VmName::new("lifecycle").unwrap(),
        cpus: Cpus::new(1).unwrap(),
        memory: MemoryMib::new(256, 1 << 20).unwrap(),
        machine: Machine::Pc,
        accel: accel::choose(&AccelProbe::of_this_host()).accel,
        boot: Boot::Kernel(
            DirectBoot::new(
                &image.kernel().expect("tiny has a kernel"),
                image.initrd().as_deref(),
                &image.manifest.append,
            )
            .unwrap(),
        ),
        disks: vec![Disk {
            path: overlay,
            format: DiskFormat::Qcow2,
            read_only: false,
        }],
        nics: vec![],
        graphics: false,
        confinement: Default::default(),
        ram: Default::default(),
        generation_id: quetzal_engine::spec::new_generation_id().expect("the kernel's random pool"),
        restore: None,
        cpu_pin: None,
    };
    let mut vm = QemuEngine::new()
        .create(&spec, &data.path().join("run"), Lifetime::TiedToCaller)
        .await
        .unwrap();
    assert_eq!(vm.state().await.unwrap(), VmState::Created);
    let console = vm.console().await.unwrap().into_std().unwrap();
    console.set_nonblocking(false).unwrap();
    let keyboard = console.try_clone().unwrap();
    let console = Transcript::read_from(console);

    vm.start().await.unwrap();

    assert_eq!(next_event(&mut vm).await, VmEvent::Running);
    console.wait_for("tiny:/# ");
    Booted {
        vm,
        console,
        keyboard,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_guest_and_resume_continues_it() {
    let data = DataDir::new();
    let mut booted = boot(&data).await;

    booted.vm.pause().await.unwrap();
    assert_eq!(next_event(&mut booted.vm).await, VmEvent::Paused);
    assert_eq!(booted.vm.state().await.unwrap(), VmState::Paused);
    let before = booted.console.len();
    booted.type_line("echo awake-$((40 + 2))");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !booted.console.text()[before..].contains("awake-42"),
        "a paused guest ran a command"
    );

    booted.vm.resume().await.unwrap();

    assert_eq!(next_event(&mut booted.vm).await, VmEvent::Running);
    assert_eq!(booted.vm.state().await.unwrap(), VmState::Running);
    booted
        .console
        .wait_for_after(before, "awake-42", GUEST_TIMEOUT);
    booted.vm.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerdown_makes_the_guest_shut_itself_down() {
    let data = DataDir::new();
    let mut booted = boot(&data).await;

    booted.vm.powerdown().await.unwrap();

    let events = events_until_exit(&mut booted.vm).await;
    booted.console.wait_for("reboot: Power down");
    assert_eq!(events.first(), Some(&VmEvent::PowerdownRequested));
    assert!(events.contains(&VmEvent::GuestPoweredOff), "{events:?}");
    assert_eq!(events.last(), Some(&VmEvent::Exited { expected: true }));
    assert!(booted.vm.wait().await.unwrap().unwrap().success());
    assert_eq!(booted.vm.state().await.unwrap(), VmState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_qemu_at_once() {
    let data = DataDir::new();
    let mut booted = boot(&data).await;

    booted.vm.stop().await.unwrap();

    let events = events_until_exit(&mut booted.vm).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, VmEvent::ShuttingDown { .. })),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&VmEvent::Exited { expected: true }));
    assert!(booted.vm.wait().await.unwrap().unwrap().success());
    assert_eq!(booted.vm.state().await.unwrap(), VmState::Stopped);
    assert_no_process_mentions(&data.path().display().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_reported_as_an_unexpected_exit() {
    let data = DataDir::new();
    let mut booted = boot(&data).await;
    let pid = booted.vm.pid().unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    assert_eq!(
        next_event(&mut booted.vm).await,
        VmEvent::Exited { expected: false }
    );
    assert_eq!(
        next_event(&mut booted.vm).await,
        VmEvent::Exited { expected: false }
    );
    assert!(!booted.vm.wait().await.unwrap().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_is_reported_as_a_crash() {
    let data = DataDir::new();
    let mut booted = boot(&data).await;

    booted.type_line("echo c > /proc/sysrq-trigger");

    assert!(matches!(
        next_event(&mut booted.vm).await,
        VmEvent::Crashed { .. }
    ));
    assert_eq!(
        next_event(&mut booted.vm).await,
        VmEvent::Exited { expected: false }
    );
}
