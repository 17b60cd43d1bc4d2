//! Guest hardening against the sandbox's own commands (issue 8): nothing inside the VM can
//! reach the guest agent over vsock, and unprivileged commands cannot rewrite kernel settings
//! through `/proc/sys` or `/sys`. Real VMs, real guest kernel; the vsock client is a static
//! test binary (`vsock-probe`) copied into a test image.
//!
//! Two sandboxes in all: one default and one `--privileged`, each shared by the checks of one
//! test (the two tests run in parallel).

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::sync::OnceLock;

use common::{env, ok, stderr, stdout, TestEnv};
use matchlock_guest_proto::{ExecRequest, Frame, FrameType, SERVICE_PORT};
use matchlock_test_support::{busybox_spec, vsock_probe_binary, Entry};

const PROBE_IMAGE: &str = "busybox-vsock-probe:test";
/// An agent `Exec` request that proves an escalation if it ever runs.
const REQUEST: &str = "/probe/exec.frame";

/// Imports the busybox image plus `/usr/local/bin/vsock-probe` and an encoded `Exec` frame.
fn probe_image(e: &TestEnv) -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = vsock_probe_binary(dir.path()).expect("build vsock-probe");
        let exec = ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo escalated-uid-$(id -u)".into(),
            ],
            env: BTreeMap::new(),
            ..Default::default()
        };
        let frame = Frame::json(FrameType::Exec, &exec)
            .and_then(|f| f.encode())
            .expect("encode exec frame");
        let mut spec = busybox_spec().expect("busybox spec");
        spec.layers.push(vec![
            Entry::file(
                "usr/local/bin/vsock-probe",
                std::fs::read(&bin).expect("read"),
            )
            .mode(0o755),
            Entry::dir("probe"),
            Entry::file("probe/exec.frame", frame).mode(0o644),
        ]);
        spec.repo_tag = Some(PROBE_IMAGE.to_owned());
        let out = e.run_stdin(&["image", "import", PROBE_IMAGE], &spec.docker_save());
        ok(&out);
    });
    PROBE_IMAGE
}

/// A detached sandbox of the probe image; killed and removed when dropped.
struct Vm {
    id: String,
}

impl Vm {
    fn start(privileged: bool) -> Vm {
        let e = env();
        let image = probe_image(e);
        let mut args = vec!["run", "--image", image, "-d"];
        if privileged {
            args.push("--privileged");
        }
        let id = ok(&e.run(&args)).trim().to_owned();
        assert!(id.starts_with("vm-"), "unexpected id {id:?}");
        Vm { id }
    }

    /// `matchlock exec [-u user] <id> -- sh -c script`.
    fn sh(&self, user: Option<&str>, script: &str) -> Output {
        let mut args = vec!["exec"];
        if let Some(u) = user {
            args.extend(["-u", u]);
        }
        args.extend([self.id.as_str(), "--", "sh", "-c", script]);
        env().run(&args)
    }

    fn console_log(&self) -> String {
        let path = env()
            .state_dir()
            .join("vms")
            .join(&self.id)
            .join("logs/vm.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        env().kill_and_rm(&self.id);
    }
}

/// Runs `vsock-probe <cid> SERVICE_PORT REQUEST` in `vm` as `user`; returns its stdout.
fn probe(vm: &Vm, user: Option<&str>, cid: u32) -> String {
    // `timeout`: a connect that is never answered must not hang the test.
    let script = format!("timeout 20 vsock-probe {cid} {SERVICE_PORT} {REQUEST}; echo rc=$?");
    stdout(&vm.sh(user, &script))
}

#[test]
fn default_sandbox_commands_cannot_reach_the_agent_or_kernel_settings() {
    let vm = Vm::start(false);
    unprivileged_commands_cannot_open_vsock_sockets(&vm);
    unprivileged_commands_cannot_write_proc_sys_or_sys(&vm);
    // The agent still serves the host.
    assert_eq!(ok(&vm.sh(None, "echo still-served")), "still-served\n");
}

#[test]
fn privileged_sandbox_commands_cannot_reach_the_agent_but_may_tune_the_kernel() {
    let vm = Vm::start(true);
    privileged_commands_cannot_reach_the_agent_from_inside(&vm);
    let out = ok(&vm.sh(
        None,
        "echo priv-host > /proc/sys/kernel/hostname && hostname",
    ));
    assert_eq!(out, "priv-host\n");
}

fn unprivileged_commands_cannot_open_vsock_sockets(vm: &Vm) {
    // Root without the dropped capabilities, and an ordinary user; the loopback CID, the
    // guest's own CID and the host.
    for user in [None, Some("nobody")] {
        for cid in [1, 3, 2] {
            let out = probe(vm, user, cid);
            assert!(
                out.starts_with("socket: Operation not permitted") && out.contains("rc=2"),
                "user {user:?} cid {cid}: {out}"
            );
        }
    }
}

fn privileged_commands_cannot_reach_the_agent_from_inside(vm: &Vm) {
    for user in [None, Some("nobody")] {
        // No loopback transport: CID 1 goes to the device, which has nobody there.
        let out = probe(vm, user, 1);
        assert!(
            out.starts_with("connect: ") && out.contains("rc=3"),
            "user {user:?} cid 1: {out}"
        );
        // The guest's own CID is refused by the kernel's virtio transport (no hairpin).
        let out = probe(vm, user, 3);
        assert!(
            out.starts_with("connect: ") && out.contains("rc=3"),
            "user {user:?} cid 3: {out}"
        );
        assert!(!out.contains("escalated"), "{out}");
    }
    // Nothing reached the agent, so nothing was refused or run on the probe's behalf.
    let log = vm.console_log();
    assert!(!log.contains("escalated"), "{log}");
    assert!(!log.contains("refused agent connection"), "{log}");
}

/// Writes that change the whole VM; each must fail for unprivileged commands.
const KERNEL_WRITES: [&str; 4] = [
    "echo evil > /proc/sys/kernel/hostname",
    "echo /bin/evil > /proc/sys/kernel/poweroff_cmd",
    "echo 3 > /proc/sys/vm/drop_caches",
    "echo +pids > /sys/fs/cgroup/cgroup.subtree_control",
];

fn unprivileged_commands_cannot_write_proc_sys_or_sys(vm: &Vm) {
    for user in [None, Some("nobody")] {
        for write in KERNEL_WRITES {
            let script = format!("{write} && echo WROTE");
            let o = vm.sh(user, &script);
            assert!(
                !o.status.success() && !stdout(&o).contains("WROTE"),
                "user {user:?}: {write} succeeded"
            );
        }
    }
    // Root gets EROFS (not merely EACCES), and the ways around the read-only mounts fail too:
    // remounting or unmounting them, a user namespace, PID 1's view of the filesystem.
    let escapes = [
        "mount -o remount,rw /proc/sys; echo evil > /proc/sys/kernel/hostname",
        "umount /proc/sys; echo evil > /proc/sys/kernel/hostname",
        "unshare -Urm sh -c 'umount /proc/sys; echo evil > /proc/sys/kernel/hostname'",
        "echo evil > /proc/1/root/proc/sys/kernel/hostname",
        "mount -o remount,rw /sys; echo +pids > /sys/fs/cgroup/cgroup.subtree_control",
    ];
    for escape in escapes {
        let o = vm.sh(None, &format!("{escape} && echo WROTE"));
        assert!(!stdout(&o).contains("WROTE"), "{escape}: {}", stderr(&o));
    }
    let o = vm.sh(None, "echo evil > /proc/sys/kernel/hostname");
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    let state = ok(&vm.sh(
        None,
        "cat /proc/sys/kernel/hostname /proc/sys/kernel/poweroff_cmd",
    ));
    assert!(!state.contains("evil"), "kernel settings changed: {state}");
    let controllers = ok(&vm.sh(None, "cat /sys/fs/cgroup/cgroup.subtree_control"));
    assert!(!controllers.contains("pids"), "{controllers}");
    // Reading stays allowed.
    assert!(ok(&vm.sh(Some("nobody"), "cat /proc/sys/kernel/ostype")).contains("Linux"));
}
