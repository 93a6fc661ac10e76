//! The node's rules against the in-memory engine: states, what the
//! engine does by itself, recovery after a daemon restart, operations —
//! without QEMU (the end-to-end tests run the same paths with it).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quetzal_api::{CreateVm, EventKind, OperationState, RestartPolicy, VmState};
use quetzal_engine::memory::MemoryEngine;
use quetzal_engine::{AnyEngine, Engines, VmEvent};
use tokio::sync::broadcast;

use super::{Created, ErrorKind, Node, NodeError, Published};
use crate::net::HostNetworks;

/// A data directory with a stand-in `tiny` image (stub files: the
/// memory engine reads none of them).
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("images/tiny/test-build");
    std::fs::create_dir_all(&build).unwrap();
    let file = |name: &str| {
        // An ELF header is all a kernel's check looks at.
        std::fs::write(build.join(name), b"\x7fELF\x02\x01\x01").unwrap();
        quetzal_image::FileRecord {
            path: name.to_owned(),
            sha256: String::new(),
            bytes: 0,
        }
    };
    let manifest = quetzal_image::Manifest {
        name: "tiny".to_owned(),
        id: "test-build".to_owned(),
        recipe: 0,
        built_at_unix: 0,
        packages: vec![],
        kernel: Some(file("vmlinuz")),
        initrd: Some(file("initrd.img")),
        root_disk: file("root.qcow2"),
        root_disk_format: "qcow2".to_owned(),
        append: "console=ttyS0".to_owned(),
        modules: vec![],
        boot: quetzal_image::BootFrom::Kernel,
        firmware: quetzal_image::Firmware::Bios,
        cloud_init: None,
        imported_from: None,
    };
    std::fs::write(
        build.join("manifest.json"),
        serde_json::to_string(&manifest).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink("test-build", dir.path().join("images/tiny/current")).unwrap();
    dir
}

async fn node(data: &Path, engine: &MemoryEngine) -> Arc<Node> {
    let host_net = HostNetworks::without_host(data).unwrap();
    Node::open_with(
        data,
        Engines::only(AnyEngine::Memory(engine.clone())),
        host_net,
    )
    .await
    .unwrap()
}

/// The message of a refusal that must be a conflict (409).
fn conflict<T: std::fmt::Debug>(result: Result<T, NodeError>) -> String {
    match result {
        Err(err) if err.kind() == ErrorKind::Conflict => err.to_string(),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn request(name: &str) -> CreateVm {
    serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
}

/// Waits for the next event of `vm` of one of `kinds`.
async fn next_event(
    events: &mut broadcast::Receiver<Published>,
    vm: &str,
    kinds: &[EventKind],
) -> quetzal_api::Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Published::Event(event)) = events.recv().await
                && event.vm == vm
                && kinds.contains(&event.kind)
            {
                return event;
            }
        }
    })
    .await
    .expect("the event within 10 s")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_vm_goes_through_its_states_and_every_change_is_one_event() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        let mut events = node.subscribe();
        let Created::Vm(vm) = node.create(request("web")).await.unwrap() else {
            panic!("an overlay is made at once");
        };
        assert_eq!(vm.state, VmState::Stopped);
        assert_eq!(vm.engine, "memory");

        assert_eq!(node.start("web").await.unwrap().state, VmState::Running);
        assert_eq!(node.pause("web").await.unwrap().state, VmState::Paused);
        assert_eq!(node.resume("web").await.unwrap().state, VmState::Running);
        let stopped = node.stop("web", Duration::from_secs(5)).await.unwrap();

        assert_eq!(stopped.state, VmState::Stopped);
        let mut kinds = Vec::new();
        while let Ok(Published::Event(event)) = events.try_recv() {
            kinds.push(event.kind);
        }
        use EventKind as K;
        let expected = [
            K::Created,
            K::Starting,
            K::Started,
            K::Paused,
            K::Resumed,
            K::Stopping,
            K::Stopped,
        ];
        assert_eq!(kinds, expected);
        assert_eq!(engine.running(), 0);
    });
}

#[test]
fn what_the_state_machine_refuses_is_a_conflict_that_changes_nothing() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        node.create(request("web")).await.unwrap();

        let resume = node.resume("web").await;
        let stop = node.stop("web", Duration::from_secs(1)).await;

        assert_eq!(conflict(resume), "cannot resume a VM that is stopped");
        conflict(stop);
        assert_eq!(node.get("web").unwrap().state, VmState::Stopped);
        node.start("web").await.unwrap();
        let delete = node.delete("web", false).await;
        assert!(conflict(delete).ends_with("stop it first"));
    });
}

#[test]
fn a_vm_goes_to_the_engine_that_made_it_and_one_the_node_lacks_is_refused() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    let rt = runtime();
    rt.block_on(async {
        let node = node(data.path(), &engine).await;
        node.create(request("web")).await.unwrap();
    });
    rt.block_on(async {
        // A node whose only engine is another one (`true` stands in for
        // a QEMU binary: it is never run).
        let other = quetzal_engine::QemuEngine::with_binary("true".into());
        let host_net = HostNetworks::without_host(data.path()).unwrap();
        let node = Node::open_with(data.path(), Engines::only(AnyEngine::Qemu(other)), host_net)
            .await
            .unwrap();

        let start = node.start("web").await;

        assert!(
            conflict(start).contains("runs on the memory engine, which this node does not have")
        );
        let vm = node.get("web").unwrap();
        assert_eq!((vm.state, vm.engine.as_str()), (VmState::Stopped, "memory"));
        assert_eq!(engine.running(), 0);
    });
}

#[test]
fn a_vm_the_engine_pauses_by_itself_shows_as_paused_and_running_again() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        node.create(request("web")).await.unwrap();
        node.start("web").await.unwrap();
        let dir = data.path().join("vms/web");
        let mut events = node.subscribe();

        engine.report(
            &dir,
            VmEvent::DiskError {
                no_space: true,
                reason: "No space left on device".to_owned(),
            },
        );
        engine.report(&dir, VmEvent::Paused);
        let paused = next_event(&mut events, "web", &[EventKind::Paused]).await;
        engine.report(&dir, VmEvent::Running);
        let resumed = next_event(&mut events, "web", &[EventKind::Resumed]).await;

        assert!(
            paused.cause.contains("no space left for its disk"),
            "{}",
            paused.cause
        );
        assert_eq!(paused.state, Some(VmState::Paused));
        assert_eq!(resumed.state, Some(VmState::Running));
        assert_eq!(node.get("web").unwrap().state, VmState::Running);
    });
}

#[test]
fn a_dead_engine_process_is_a_crash_and_the_policy_starts_it_again() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        let mut create = request("web");
        create.restart_policy = RestartPolicy::OnFailure;
        node.create(create).await.unwrap();
        node.start("web").await.unwrap();
        let mut events = node.subscribe();

        engine.crash(&data.path().join("vms/web"));

        let crashed = next_event(&mut events, "web", &[EventKind::Crashed]).await;
        assert_eq!(crashed.state, Some(VmState::Crashed));
        next_event(&mut events, "web", &[EventKind::Restarting]).await;
        let restarted = next_event(&mut events, "web", &[EventKind::Restarted]).await;
        assert_eq!(restarted.state, Some(VmState::Running));
        assert_eq!(node.get("web").unwrap().restarts, 1);
        assert_eq!(engine.running(), 1);
    });
}

#[test]
fn a_restarted_daemon_keeps_what_runs_and_marks_what_died_meanwhile() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    // The first daemon: its runtime ends with it, as a killed process.
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        for name in ["alive", "dies"] {
            node.create(request(name)).await.unwrap();
            node.start(name).await.unwrap();
        }
        node.pause("alive").await.unwrap();
    });
    engine.crash(&data.path().join("vms/dies"));

    runtime().block_on(async {
        let node = node(data.path(), &engine).await;

        let alive = node.get("alive").unwrap();
        assert_eq!(alive.state, VmState::Paused, "still paused, taken over");
        assert_eq!(node.get("dies").unwrap().state, VmState::Crashed);
        let kinds: Vec<EventKind> = node
            .events(0, 100, Some("alive"))
            .unwrap()
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds.last(), Some(&EventKind::Reattached));
        assert_eq!(node.resume("alive").await.unwrap().state, VmState::Running);
        assert_eq!(engine.running(), 1);
    });
}

#[test]
fn a_full_clone_is_an_operation_and_its_vm_is_creating_until_the_copy_is_done() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        node.create(request("golden")).await.unwrap();
        let made = node
            .create_template(
                serde_json::from_value(serde_json::json!({"name": "base", "from_vm": "golden"}))
                    .unwrap(),
            )
            .await
            .unwrap();
        wait_operation(&node, &made.id).await;
        let mut events = node.subscribe();

        let clone: CreateVm = serde_json::from_value(
            serde_json::json!({"name": "c1", "template": "base", "full_clone": true}),
        )
        .unwrap();
        let Created::Operation(op) = node.create(clone).await.unwrap() else {
            panic!("a full clone is an operation");
        };
        let done = wait_operation(&node, &op.id).await;

        assert_eq!(
            (done.state, done.progress),
            (OperationState::Succeeded, 100)
        );
        let first = next_event(
            &mut events,
            "c1",
            &[EventKind::Creating, EventKind::Created],
        )
        .await;
        assert_eq!(first.kind, EventKind::Creating);
        let second = next_event(&mut events, "c1", &[EventKind::Created]).await;
        assert_eq!(second.state, Some(VmState::Stopped));
        assert!(data.path().join("vms/c1/disk.img").exists());
    });
}

async fn wait_operation(node: &Node, id: &str) -> quetzal_api::Operation {
    let mut events = node.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let op = node.operations().get(id).unwrap();
            if op.state != OperationState::Running {
                return op;
            }
            // Woken by the operation's next change.
            let _ = events.recv().await;
        }
    })
    .await
    .expect("the operation ends within 10 s")
}
