//! Real VMs under QEMU (TCG here): boot to a marker and self-exit, kill, and owner death.
//!
//! The guest is the cached kernel from `scripts/build-kernel.sh` with a busybox initramfs
//! (`/init` is a `#!/bin/busybox sh` script). If the kernel is not built these tests fail
//! with a message saying how to build it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use matchlock_guest_proto::{READY_PORT, SERVICE_PORT};
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

/// An initramfs with busybox, `extra` files and `script` as `/init`.
fn busybox_initramfs(dir: &Path, extra: &[Entry], script: &str) -> PathBuf {
    let busybox = fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let mut entries = vec![
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
    entries.extend_from_slice(extra);
    let path = dir.join("initramfs.cpio");
    assets::write_initramfs(&entries, &path).expect("write initramfs");
    path
}

fn config(dir: &Path, script: &str) -> VmConfig {
    config_with(dir, busybox_initramfs(dir, &[], script))
}

fn config_with(dir: &Path, initramfs: PathBuf) -> VmConfig {
    let mut c = VmConfig::new("boot-test", dir.join("state"), kernel(), initramfs);
    c.memory_mb = 256;
    c.console_log = dir.join("console.log");
    c.console_max_bytes = matchlock_vm::console::DEFAULT_CONSOLE_MAX_BYTES;
    c.channel = matchlock_vm::Channel::Vsock;
    c
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
    // What this asserts depends on the host, decided by the same probe `--accel auto` uses:
    // with usable KVM the VM must boot under KVM; without (a PVM-backed /dev/kvm, no
    // vmx/svm, no access) the start must be refused with the probe's reason.
    let probe = matchlock_vm::detect_accel(Accel::Kvm);
    let usable = matchlock_vm::detect_accel(Accel::Auto).accel == Accel::Kvm;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(
        dir.path(),
        &format!("/bin/busybox echo {MARKER}\n/bin/busybox reboot -f"),
    );
    cfg.accel = Accel::Kvm;
    match (usable, backend("qemu").expect("backend").start(&cfg)) {
        (false, Err(VmError::KvmUnusable { reason })) => {
            assert!(!reason.is_empty());
            assert!(
                probe.reason.contains(&reason),
                "{} vs {reason}",
                probe.reason
            );
        }
        (false, Err(e)) => panic!("unexpected error: {e}"),
        (false, Ok(_)) => panic!(
            "KVM is unusable here ({}) and must be refused",
            probe.reason
        ),
        (true, Ok(vm)) => {
            assert!(
                vm.wait_exit(Duration::from_secs(30)),
                "{}",
                vm.console_tail(30)
            );
            assert!(console(&cfg).contains(MARKER), "{}", console(&cfg));
        }
        (true, Err(e)) => panic!(
            "KVM is usable here ({}) but start failed: {e}",
            probe.reason
        ),
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

/// Builds `tests/fixtures/vsock_echo.c` as a static binary for the guest.
fn build_vsock_echo(dir: &Path) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vsock_echo.c");
    let out = dir.join("vsock_echo");
    let st = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc (needed to build the guest test program)");
    assert!(st.success(), "cc -static failed for {}", src.display());
    fs::read(&out).expect("read vsock_echo")
}

#[test]
fn vsock_both_directions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let echo = build_vsock_echo(dir.path());
    let initramfs = busybox_initramfs(
        dir.path(),
        &[Entry::file("bin/vsock_echo", 0o755, echo)],
        "/bin/vsock_echo\n/bin/busybox reboot -f",
    );
    let cfg = config_with(dir.path(), initramfs);
    fs::create_dir_all(&cfg.state_dir).expect("state dir");
    // Guest-initiated connections to host port P arrive at <vsock.sock>_P.
    let base = cfg.state_dir.join("vsock.sock");
    let ready = UnixListener::bind(hybrid::listener_path(&base, READY_PORT)).expect("bind ready");
    ready.set_nonblocking(true).expect("nonblocking");

    let t0 = Instant::now();
    let vm = backend("qemu")
        .expect("backend")
        .start(&cfg)
        .expect("start VM");
    assert_eq!(vm.vsock_path(), base);
    let mut conn = None;
    let accepted = wait_until(Duration::from_secs(30), || {
        if let Ok((s, _)) = ready.accept() {
            conn = Some(s);
        }
        conn.is_some() || vm.has_exited().is_some()
    });
    let Some(conn) = conn.filter(|_| accepted) else {
        panic!("no ready connection; console:\n{}", vm.console_tail(30));
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line, "READY\n");
    let ready_at = t0.elapsed();

    // Host-initiated: the greeting the guest writes right after accept must not be lost.
    let mut s = vm
        .connect(SERVICE_PORT, Duration::from_secs(10))
        .expect("connect to guest port 5000");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 6];
    s.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello, b"hello\n");
    let mut rtts = Vec::new();
    for i in 0..50u8 {
        let t = Instant::now();
        s.write_all(&[i]).expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo");
        assert_eq!(b[0], i);
        rtts.push(t.elapsed());
    }
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = s.try_clone().expect("clone");
        let big = big.clone();
        thread::spawn(move || w.write_all(&big).expect("write big"))
    };
    let mut back = vec![0u8; big.len()];
    s.read_exact(&mut back).expect("read big");
    writer.join().expect("writer");
    assert!(back == big, "echoed bytes differ");
    drop(s);

    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "guest did not power off after EOF; console:\n{}",
        vm.console_tail(30)
    );
    assert!(console(&cfg).contains("VSOCK-ECHO-DONE"));
    rtts.sort();
    eprintln!(
        "vsock: ready after {:.3} s, 1-byte round trip median {:?}",
        ready_at.as_secs_f64(),
        rtts[rtts.len() / 2]
    );
}

#[test]
fn disks_and_vcpus_reach_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(
        dir.path(),
        "/bin/busybox mkdir -p /sys\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         for d in vda vdb; do /bin/busybox echo \"DISK $d $(/bin/busybox cat /sys/block/$d/serial) ro=$(/bin/busybox cat /sys/block/$d/ro)\"; done\n\
         /bin/busybox echo \"CPUS $(/bin/busybox nproc)\"\n\
         /bin/busybox reboot -f",
    );
    for (name, serial, readonly) in [
        ("lower.img", "ml-lower0", true),
        ("upper.img", "ml-upper", false),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, vec![0u8; 1 << 20]).expect("disk image");
        cfg.disks.push(matchlock_vm::Disk {
            path,
            serial: serial.into(),
            readonly,
        });
    }
    cfg.vcpus = 2;
    let vm = backend("qemu")
        .expect("backend")
        .start(&cfg)
        .expect("start VM");
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "no power-off; console:\n{}",
        vm.console_tail(30)
    );
    let log = console(&cfg);
    assert!(log.contains("DISK vda ml-lower0 ro=1"), "{log}");
    assert!(log.contains("DISK vdb ml-upper ro=0"), "{log}");
    assert!(log.contains("CPUS 2"), "{log}");
}
