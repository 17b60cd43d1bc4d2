//! Helper confinement on the real host: a real VM boots with QEMU under its seccomp sandbox
//! and both helpers under Landlock, and the Landlock ruleset a VM's helpers get is enforced
//! (shown with a probe and with the real QEMU binary run through the same spawner path).
//!
//! These tests need a kernel with Landlock and a QEMU built with seccomp (this project's
//! machines have both: Linux 6.x, Debian's QEMU); elsewhere they fail, saying which.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use matchlock_vm::confine::{run_confined, Rules};
use matchlock_vm::cpio::Entry;
use matchlock_vm::{assets, backend, host_confinement, Accel, Disk, VmConfig};

fn kernel() -> PathBuf {
    let k = assets::kernel_path();
    assert!(
        k.is_file(),
        "guest kernel not built at {}: run scripts/build-kernel.sh",
        k.display()
    );
    k
}

/// A VM config inside `dir`: state under `dir/vm`, assets under `dir/assets`, a disk each
/// read-only and writable; nothing is created but the asset files.
fn config(dir: &Path, kernel: PathBuf, script: &str) -> VmConfig {
    let assets_dir = dir.join("assets");
    fs::create_dir_all(&assets_dir).expect("mkdir");
    let busybox = fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let initramfs = assets_dir.join("initramfs.cpio");
    assets::write_initramfs(
        &[
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("bin", 0o755),
            Entry::file("bin/busybox", 0o755, busybox),
            Entry::file(
                "init",
                0o755,
                format!("#!/bin/busybox sh\n{script}\n").into_bytes(),
            ),
        ],
        &initramfs,
    )
    .expect("initramfs");
    let ro = assets_dir.join("ro.img");
    let rw = assets_dir.join("rw.img");
    for d in [&ro, &rw] {
        fs::write(d, vec![0u8; 1 << 20]).expect("disk");
    }
    VmConfig {
        id: "confine-test".into(),
        state_dir: dir.join("vm"),
        kernel,
        initramfs,
        vcpus: 1,
        memory_mb: 128,
        disks: vec![
            Disk {
                path: ro,
                serial: "ro".into(),
                readonly: true,
            },
            Disk {
                path: rw,
                serial: "rw".into(),
                readonly: false,
            },
        ],
        console_log: dir.join("logs/vm.log"),
        console_max_bytes: matchlock_vm::console::DEFAULT_CONSOLE_MAX_BYTES,
        net: None,
        fs: None,
        channel: matchlock_vm::Channel::Vsock,
        snapshot: None,
        accel: Accel::Tcg,
        extra_cmdline: Vec::new(),
        qemu_binary: None,
        vsock_binary: None,
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Host TSC kHz (TCG guests may hang calibrating the TSC without `tsc_early_khz`).
fn host_khz() -> u64 {
    let info = fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let mhz: f64 = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0) as u64
}

#[test]
fn this_host_confines_helpers() {
    let c = host_confinement(None);
    assert_eq!(c.qemu_seccomp, Ok(()), "QEMU must support -sandbox here");
    assert!(
        c.landlock_abi.is_some_and(|v| v >= 1),
        "this kernel must have Landlock: {c:?}"
    );
}

#[test]
fn landlock_rules_of_a_vm_are_enforced_on_a_probe() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A kernel stand-in: the probe only reads it.
    let fake_kernel = dir.path().join("assets/vmlinux");
    fs::create_dir_all(fake_kernel.parent().expect("parent")).expect("mkdir");
    fs::write(&fake_kernel, "kernel bytes").expect("write");
    let cfg = config(dir.path(), fake_kernel.clone(), "true");
    fs::create_dir_all(&cfg.state_dir).expect("mkdir state");
    fs::create_dir_all(cfg.console_log.parent().expect("logs")).expect("mkdir logs");
    fs::write(&cfg.console_log, "").expect("log");
    let outside = dir.path().join("outside-secret.txt");
    fs::write(&outside, "secret").expect("write");
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).expect("chmod");

    let rules = Rules::for_vm(&cfg, Path::new("/bin/busybox"), Accel::Tcg);
    let sh = |script: &str| {
        let mut cmd = Command::new("/bin/busybox");
        cmd.args(["sh", "-c", script]);
        let out = run_confined(&rules, cmd).expect("run probe");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = sh(&format!("/bin/busybox cat {}", fake_kernel.display()));
    assert!(
        ok && out.contains("kernel bytes"),
        "allowed read failed: {out}"
    );
    let state_file = cfg.state_dir.join("probe");
    let (ok, out) = sh(&format!("echo hi > {}", state_file.display()));
    assert!(ok, "write in the VM directory failed: {out}");
    assert_eq!(fs::read_to_string(&state_file).expect("read"), "hi\n");

    let (ok, out) = sh(&format!("/bin/busybox cat {}", outside.display()));
    assert!(
        !ok && out.contains("Permission denied"),
        "outside read allowed: {out}"
    );
    let (ok, out) = sh(&format!("echo x > {}", dir.path().join("new").display()));
    assert!(
        !ok && out.contains("Permission denied"),
        "outside write allowed: {out}"
    );
    let (ok, out) = sh(&format!("echo x >> {}", fake_kernel.display()));
    assert!(
        !ok && out.contains("Permission denied"),
        "kernel writable: {out}"
    );
    let (ok, out) = sh("/bin/busybox ls /root /home /tmp");
    assert!(
        !ok && out.contains("Permission denied"),
        "home listable: {out}"
    );
    // The probe's own status shows the spawner set no_new_privs (required by Landlock).
    let (ok, out) = sh("/bin/busybox grep NoNewPrivs /proc/self/status");
    assert!(ok && out.contains('1'), "{out}");
}

#[test]
fn real_qemu_under_the_vm_ruleset_cannot_open_a_kernel_elsewhere() {
    // The real QEMU binary, spawned like the helper with the ruleset of a VM whose kernel is
    // `assets/vmlinux`, is asked to boot a copy of the same kernel from outside the set.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), kernel(), "true");
    fs::create_dir_all(&cfg.state_dir).expect("mkdir state");
    let outside = dir.path().join("elsewhere-vmlinux");
    fs::copy(&cfg.kernel, &outside).expect("copy kernel");
    let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    let rules = Rules::for_vm(&cfg, &qemu, Accel::Tcg);
    // Without an initramfs the kernel panics; `panic=-1 reboot=t` + `-no-reboot` then end
    // QEMU with status 0, so a QEMU that could open the kernel exits successfully.
    // `timeout` (itself under the ruleset) bounds a guest that hangs anyway.
    let append = format!("panic=-1 reboot=t tsc_early_khz={}", host_khz());
    let boot = |kernel: &Path| {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg(&qemu)
            .args(["-M", "microvm", "-nodefaults", "-no-user-config"])
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-accel",
                "tcg",
                "-m",
                "64M",
            ])
            .args(["-append", &append])
            .arg("-kernel")
            .arg(kernel);
        run_confined(&rules, cmd).expect("run qemu")
    };
    let out = boot(&outside);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "QEMU booted a kernel outside its ruleset"
    );
    assert!(err.contains("Permission denied"), "{err}");
    // The same binary and ruleset boot the VM's own kernel.
    let out = boot(&cfg.kernel);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vm_boots_with_seccomp_and_landlocked_helpers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        kernel(),
        "/bin/busybox echo CONFINED-BOOT\nexec /bin/busybox sleep 1000000",
    );
    let vm = backend("qemu")
        .expect("backend")
        .start(&cfg)
        .expect("start VM");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&cfg.console_log)
        .unwrap_or_default()
        .contains("CONFINED-BOOT")
    {
        assert!(
            Instant::now() < deadline,
            "no boot marker: {}",
            vm.console_tail(30)
        );
        assert!(
            vm.has_exited().is_none(),
            "VM died: {}",
            vm.console_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = vm.pids();
    let (qemu, helper) = (pids[0], pids[1]);
    assert_eq!(
        status_field(qemu, "Seccomp"),
        "2",
        "QEMU runs its seccomp sandbox"
    );
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(helper, "NoNewPrivs"),
        "1",
        "helper confined before exec"
    );
    // Private files: the state directory 0700, the console log 0600.
    let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.state_dir), 0o700);
    assert_eq!(mode(&cfg.console_log), 0o600);
    assert_eq!(mode(cfg.console_log.parent().expect("logs")), 0o700);
    vm.kill().expect("kill");
}
