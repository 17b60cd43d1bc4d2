//! Real VMs under QEMU (TCG here): boot to a marker and self-exit, kill, and owner death.
//!
//! The guest is the cached kernel from `scripts/build-kernel.sh` with a busybox initramfs
//! (`/init` is a `#!/bin/busybox sh` script). If the kernel is not built these tests fail
//! with a message saying how to build it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use matchlock_vm::cpio::Entry;
use matchlock_vm::{assets, backend, hybrid, Accel, VmConfig, VmError};

const MARKER: &str = "MATCHLOCK-BOOT-MARKER";
const CHILD_ENV: &str = "MATCHLOCK_VM_TEST_OWNER_DIR";

fn kernel() -> PathBuf {
    let k = assets::kernel_path();
    assert!(
        k.is_file(),
        "guest kernel not built at {}: run scripts/build-kernel.sh (about 7 minutes)",
        k.display()
    );
    k
}

/// An initramfs with busybox and `script` as `/init`.
fn busybox_initramfs(dir: &Path, script: &str) -> PathBuf {
    let busybox = fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let entries = vec![
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", 0o755, busybox),
        Entry::file(
            "init",
            0o755,
            format!("#!/bin/busybox sh\n{script}\n").into_bytes(),
        ),
    ];
    let path = dir.join("initramfs.cpio");
    assets::write_initramfs(&entries, &path).expect("write initramfs");
    path
}

fn config(dir: &Path, script: &str) -> VmConfig {
    VmConfig {
        id: "boot-test".into(),
        state_dir: dir.join("state"),
        kernel: kernel(),
        initramfs: busybox_initramfs(dir, script),
        vcpus: 1,
        memory_mb: 256,
        disks: Vec::new(),
        console_log: dir.join("console.log"),
        accel: Accel::Auto,
        extra_cmdline: Vec::new(),
        qemu_binary: None,
        vsock_binary: None,
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Alive = exists in /proc and is not a zombie.
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn console(cfg: &VmConfig) -> String {
    fs::read_to_string(&cfg.console_log).unwrap_or_default()
}

#[test]
fn boots_prints_marker_and_powers_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &format!("/bin/busybox echo {MARKER}\n/bin/busybox reboot -f"),
    );
    let qemu = backend("qemu").expect("qemu backend");
    let t0 = Instant::now();
    let vm = qemu.start(&cfg).expect("start VM");
    let exited = vm.wait_exit(Duration::from_secs(30));
    let elapsed = t0.elapsed();
    assert!(
        exited,
        "QEMU did not exit within 30 s; console:\n{}",
        vm.console_tail(30)
    );
    let log = console(&cfg);
    assert!(log.contains(MARKER), "marker missing; console:\n{log}");
    let status = vm.has_exited().expect("exited");
    assert!(status.contains("exit code 0"), "{status}");
    // The helper is stopped once QEMU is gone.
    let pids = vm.pids();
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pids[1])),
        "vhost-device-vsock {} outlived QEMU",
        pids[1]
    );
    eprintln!("boot-to-exit: {:.3} s", elapsed.as_secs_f64());
}

#[test]
fn kill_stops_qemu_and_helper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &format!("/bin/busybox echo {MARKER}\nexec /bin/busybox sleep 1000000"),
    );
    let vm = backend("qemu")
        .expect("qemu backend")
        .start(&cfg)
        .expect("start VM");
    assert!(
        wait_until(Duration::from_secs(30), || console(&cfg).contains(MARKER)),
        "guest never printed the marker; console:\n{}",
        vm.console_tail(30)
    );
    // The guest kernel's vsock driver answers: nothing listens on 5000, so the connection is
    // reset (EOF), not left hanging (which would mean a dead device or backend).
    let err = hybrid::connect(vm.vsock_path(), 5000, Duration::from_secs(20))
        .expect_err("no guest listener");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    // Machine::connect retries until its timeout and then reports the port.
    let err = vm
        .connect(5000, Duration::from_millis(500))
        .expect_err("no listener");
    assert!(matches!(err, VmError::Connect { port: 5000, .. }), "{err}");

    let pids = vm.pids();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    assert!(vm.has_exited().is_none());
    vm.kill().expect("kill");
    for p in &pids {
        assert!(!alive(*p), "pid {p} still alive after kill");
    }
    assert!(vm.has_exited().is_some());
    vm.kill().expect("kill is idempotent");
}

#[test]
fn explicit_kvm_fails_when_unusable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), "/bin/busybox reboot -f");
    cfg.accel = Accel::Kvm;
    match backend("qemu").expect("backend").start(&cfg) {
        Err(VmError::KvmUnusable { reason }) => assert!(!reason.is_empty()),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("KVM is PVM-backed here and must be refused"),
    }
}

/// Not a test on its own: the body of the child process in `owner_death_kills_vm`.
#[test]
#[ignore = "helper run by owner_death_kills_vm in a child process"]
fn owner_helper() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    // Started from a short-lived thread on purpose: the death signal must follow the
    // process, not the thread that asked for the VM.
    let vm = thread::spawn({
        let dir = dir.clone();
        move || {
            let cfg = config(&dir, "exec /bin/busybox sleep 1000000");
            backend("qemu")
                .expect("backend")
                .start(&cfg)
                .expect("start VM")
        }
    })
    .join()
    .expect("starter thread");
    let pids: Vec<String> = vm.pids().iter().map(u32::to_string).collect();
    fs::write(dir.join("pids.tmp"), pids.join(" ")).expect("write pids");
    fs::rename(dir.join("pids.tmp"), dir.join("pids")).expect("publish pids");
    thread::sleep(Duration::from_secs(120));
    drop(vm);
}

#[test]
fn owner_death_kills_vm() {
    kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut owner = Command::new(exe)
        .args(["--ignored", "--exact", "owner_helper", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .spawn()
        .expect("spawn owner");
    let pids_file = dir.path().join("pids");
    let published = wait_until(Duration::from_secs(30), || pids_file.exists());
    if !published {
        let _ = owner.kill();
        let _ = owner.wait();
        panic!("owner never started its VM");
    }
    let pids: Vec<u32> = fs::read_to_string(&pids_file)
        .expect("read pids")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2);
    // Let the starter thread exit and the VM run a little: both must survive that.
    thread::sleep(Duration::from_millis(300));
    assert!(
        pids.iter().all(|p| alive(*p)),
        "VM died with its starter thread"
    );
    owner.kill().expect("SIGKILL owner");
    owner.wait().expect("reap owner");
    for p in &pids {
        assert!(
            wait_until(Duration::from_secs(5), || !alive(*p)),
            "pid {p} outlived its SIGKILLed owner"
        );
    }
}
