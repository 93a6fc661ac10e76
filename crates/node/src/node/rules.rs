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

/// Waits until `check` holds, looking again at each event the node
/// publishes.
async fn until(node: &Node, what: &str, mut check: impl FnMut() -> bool) {
    let mut events = node.subscribe();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            let _ = events.recv().await;
        }
    })
    .await;
    assert!(found.is_ok(), "{what} within 10 s");
}

/// A node with template `name` (cold: the memory engine has no warm
/// memory) made from a stopped VM.
async fn with_template(node: &Arc<Node>, name: &str) {
    let vm = format!("{name}-source");
    node.create(request(&vm)).await.unwrap();
    let made = node
        .create_template(
            serde_json::from_value(serde_json::json!({"name": name, "from_vm": vm})).unwrap(),
        )
        .await
        .unwrap();
    wait_operation(node, &made.id).await;
}

fn pool_request(template: &str, spare: u32, max: u32) -> quetzal_api::CreatePool {
    serde_json::from_value(serde_json::json!({
        "name": "lab", "template": template, "spare": spare, "max": max
    }))
    .unwrap()
}

fn ready(node: &Node) -> u32 {
    node.pool("lab").unwrap().ready
}

#[test]
fn a_pool_keeps_its_spares_hands_them_out_and_stops_at_its_max() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        with_template(&node, "base").await;
        node.create_pool(pool_request("base", 2, 3)).unwrap();
        until(&node, "two spares", || ready(&node) == 2).await;

        let alice = node.assign("lab", "alice").await.unwrap();
        until(&node, "the spare refilled", || ready(&node) == 2).await;
        let bob = node.assign("lab", "bob").await.unwrap();
        let carol = node.assign("lab", "carol").await.unwrap();
        let full = conflict(node.assign("lab", "dave").await);

        let names = [&alice.vm, &bob.vm, &carol.vm];
        assert!(names.iter().all(|vm| vm.starts_with("lab-")), "{names:?}");
        assert_ne!(alice.vm, bob.vm);
        assert_ne!(bob.vm, carol.vm);
        assert_eq!(alice.path, format!("/#/desktop/{}", alice.vm));
        assert!(full.contains("all 3 are taken"), "{full}");
        let pool = node.pool("lab").unwrap();
        assert_eq!(pool.desktops.len(), 3);
        assert_eq!(pool.ready, 0);
        assert!(
            pool.desktops
                .iter()
                .all(|d| d.state == quetzal_api::DesktopState::Assigned),
            "{pool:?}"
        );
        assert_eq!(node.get(&alice.vm).unwrap().state, VmState::Running);

        // Released: destroyed, and a fresh spare takes its place.
        node.release("lab", &alice.vm).await.unwrap();
        assert!(node.get(&alice.vm).is_err(), "the released desktop is gone");
        until(&node, "a new spare", || ready(&node) == 1).await;
        let desktops = node.pool("lab").unwrap().desktops;
        assert!(desktops.iter().all(|d| d.vm != alice.vm));
        let spare = desktops
            .iter()
            .find(|d| d.state == quetzal_api::DesktopState::Spare)
            .unwrap();
        let not_assigned = conflict(node.release("lab", &spare.vm).await);
        assert!(not_assigned.contains("not assigned"), "{not_assigned}");
    });
}

#[test]
fn a_new_template_replaces_the_spares_and_a_persistent_pool_keeps_its_users_desktops() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        with_template(&node, "v1").await;
        with_template(&node, "v2").await;
        let mut request = pool_request("v1", 2, 4);
        request.persistent = true;
        node.create_pool(request).unwrap();
        until(&node, "two spares", || ready(&node) == 2).await;
        let alice = node.assign("lab", "alice").await.unwrap();

        node.update_pool(
            "lab",
            quetzal_api::UpdatePool {
                template: Some("v2".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let on = |template: &str| {
            let pool = node.pool("lab").unwrap();
            pool.desktops
                .iter()
                .filter(|d| d.state == quetzal_api::DesktopState::Spare && d.template == template)
                .count()
        };
        until(&node, "two spares of v2 and none of v1", || {
            on("v2") == 2 && on("v1") == 0 && ready(&node) == 2
        })
        .await;
        let refused = conflict(node.delete_template("v2").await);

        // Alice's desktop is hers: released, kept; assigned again, hers.
        node.release("lab", &alice.vm).await.unwrap();
        let back = node.assign("lab", "alice").await.unwrap();
        let bob = node.assign("lab", "bob").await.unwrap();

        assert!(refused.contains("pool lab"), "{refused}");
        assert_eq!(back.vm, alice.vm);
        assert_ne!(bob.vm, alice.vm);
        assert_eq!(
            node.get(&alice.vm).unwrap().linked_to.as_deref(),
            Some("v1")
        );
        assert_eq!(node.get(&bob.vm).unwrap().linked_to.as_deref(), Some("v2"));
    });
}

#[test]
fn pools_and_who_holds_which_survive_a_restart_and_half_made_desktops_go() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    let alice = runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        with_template(&node, "base").await;
        node.create_pool(pool_request("base", 1, 4)).unwrap();
        until(&node, "one spare", || ready(&node) == 1).await;
        let alice = node.assign("lab", "alice").await.unwrap();
        until(&node, "the spare refilled", || ready(&node) == 1).await;
        alice
    });
    // A desktop whose making the daemon's end cut short.
    let cut_short = {
        use crate::store::PoolStore;
        let mut store = crate::store::SqliteStore::open(&data.path().join("quetzal.db")).unwrap();
        store.reserve_desktop("lab", "base", None).unwrap().vm
    };

    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        until(&node, "the half-made desktop gone", || {
            node.pool("lab")
                .unwrap()
                .desktops
                .iter()
                .all(|d| d.vm != cut_short)
        })
        .await;
        let pool = node.pool("lab").unwrap();
        let held = pool.desktops.iter().find(|d| d.vm == alice.vm).unwrap();

        assert_eq!(held.state, quetzal_api::DesktopState::Assigned);
        assert_eq!(held.user.as_deref(), Some("alice"));
        assert_eq!(held.vm_state, Some(VmState::Running));
        assert_eq!(pool.ready, 1);
        assert_eq!(pool.desktops.len(), 2, "{pool:?}");
    });
}

#[test]
fn bad_pool_requests_get_one_clear_error() {
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        with_template(&node, "base").await;
        let invalid = |result: Result<quetzal_api::Pool, NodeError>| match result {
            Err(err) if err.kind() == ErrorKind::Invalid => err.to_string(),
            other => panic!("expected an invalid request, got {other:?}"),
        };

        let too_many = invalid(node.create_pool(pool_request("base", 3, 2)));
        let no_max = invalid(node.create_pool(pool_request("base", 0, 0)));
        let mut long = pool_request("base", 0, 1);
        long.name = "p".repeat(57);
        let long = invalid(node.create_pool(long));
        let missing = node.create_pool(pool_request("absent", 0, 1)).unwrap_err();
        node.create_pool(pool_request("base", 0, 1)).unwrap();
        let twice = conflict(node.create_pool(pool_request("base", 0, 1)));
        let user = node.assign("lab", "bad user").await.unwrap_err();

        assert!(too_many.contains("cannot be more than max"), "{too_many}");
        assert!(no_max.contains("max must be between 1"), "{no_max}");
        assert!(long.contains("at most 56"), "{long}");
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert!(twice.contains("already exists"), "{twice}");
        assert_eq!(user.kind(), ErrorKind::Invalid);
        assert_eq!(
            node.release("lab", "lab-9").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    });
}

#[test]
fn input_on_a_console_boosts_the_vm_once_and_only_while_it_runs() {
    use quetzal_engine::spec::CpuWeight;
    let data = data_dir();
    let engine = MemoryEngine::default();
    runtime().block_on(async {
        let node = node(data.path(), &engine).await;
        node.create(request("desk")).await.unwrap();
        node.console_input("desk");
        assert_eq!(node.cpu_weight("desk"), None, "a stopped VM has no weight");
        node.start("desk").await.unwrap();
        let mut events = node.subscribe();

        node.console_input("desk");
        node.console_input("desk");
        let boost = next_event(&mut events, "desk", &[EventKind::Boost]).await;

        assert_eq!(node.cpu_weight("desk"), Some(CpuWeight::BOOSTED));
        assert!(
            boost.cause.starts_with("CPU weight 400 (4×"),
            "{}",
            boost.cause
        );
        assert!(
            events.try_recv().is_err(),
            "a second input says nothing new"
        );
    });
}
