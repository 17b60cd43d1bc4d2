//! The workspace's caching against host-side changes, and the benchmark knob that serves the
//! workspace from an external vhost-user-fs back-end (`MATCHLOCK_DEV_VHOST_USER_FS_SOCKET`,
//! what `matchlock-bench vfs` compares with upstream virtiofsd), on real VMs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, ok, stderr, stdout, IMAGE};

const KNOB: &str = "MATCHLOCK_DEV_VHOST_USER_FS_SOCKET";
/// Debian's QEMU 7.2 virtiofsd (package qemu-system-common, a dependency of
/// qemu-system-x86, which scripts/install-deps.sh installs).
const DEBIAN_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn sh(id: &str, script: &str) -> (i32, String, String) {
    let o = env().run(&["exec", id, "--", "sh", "-c", script]);
    (o.status.code().unwrap_or(-1), stdout(&o), stderr(&o))
}

/// Runs `script` in the guest until it prints `want`, at most `limit`; returns the time it
/// took (or fails the test with the last output).
#[track_caller]
fn until_guest_prints(id: &str, script: &str, want: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (_, out, err) = sh(id, script);
        if out.contains(want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{script}: no {want:?} after {limit:?}: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A guest that looked for a name and missed (a negative entry the guest may cache) sees it
/// once the host creates it, and a host-side deletion and rewrite show too, each within a
/// bounded time (the entry and attribute timeouts, 1 s, plus an exec round trip).
#[test]
fn host_side_changes_show_after_guest_misses_and_hits() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let ws = format!("{}:/workspace:host_fs", s(tmp.path()));
    let id = e.detached(&["--workspace", "/workspace", "-v", &ws]);
    let _g = e.guard(&id);
    // The miss: looked up (and cached negative) several times.
    let (code, _, _) = sh(
        &id,
        "for i in 1 2 3; do test -e /workspace/late.txt && exit 0; done; exit 1",
    );
    assert_ne!(code, 0, "late.txt exists before the host wrote it");
    std::fs::write(tmp.path().join("late.txt"), "from-the-host").expect("write");
    let took = until_guest_prints(
        &id,
        "cat /workspace/late.txt 2>/dev/null",
        "from-the-host",
        Duration::from_secs(5),
    );
    eprintln!("host-created name visible after a cached miss in {took:?}");
    // A positive entry: the host deletes the file, the guest stops seeing it.
    std::fs::remove_file(tmp.path().join("late.txt")).expect("rm");
    until_guest_prints(
        &id,
        "test -e /workspace/late.txt || echo gone",
        "gone",
        Duration::from_secs(5),
    );
    // A directory the guest listed gains an entry on the host.
    ok(&e.run(&["exec", &id, "--", "ls", "/workspace"]));
    std::fs::write(tmp.path().join("listed.txt"), "x").expect("write");
    until_guest_prints(&id, "ls /workspace", "listed.txt", Duration::from_secs(5));
}

/// An owner started with a low soft open-file limit (256; the hard limit as it is, as with
/// a login shell's 1024 soft limit) still serves a
/// workspace in which the guest creates and reads 600 files: the server holds a descriptor
/// per inode the guest knows, and raises the limit as virtiofsd does (else `EMFILE`).
#[test]
fn many_files_under_a_low_open_file_limit() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let ws = format!("{}:/workspace:host_fs", s(tmp.path()));
    let mut c = e.cmd_with_ulimit("-Sn 256");
    c.args([
        "run",
        "--image",
        IMAGE,
        "--workspace",
        "/workspace",
        "-v",
        &ws,
        "--",
    ])
    .args([
        "sh",
        "-c",
        "mkdir /workspace/d && i=0; while [ $i -lt 600 ]; do \
             echo x > /workspace/d/f$i || exit 9; i=$((i+1)); done; \
             ls /workspace/d | wc -l; cat /workspace/d/* | wc -l",
    ])
    .stdin(Stdio::null());
    let o = c.output().expect("spawn");
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["600", "600"],
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("d")).expect("ls").count(),
        600
    );
}

/// Starts Debian's virtiofsd on `share`, listening on `socket`.
fn virtiofsd(share: &Path, socket: &Path) -> std::process::Child {
    assert!(
        Path::new(DEBIAN_VIRTIOFSD).is_file(),
        "{DEBIAN_VIRTIOFSD} missing: install qemu-system-x86 (scripts/install-deps.sh)"
    );
    let child = Command::new(DEBIAN_VIRTIOFSD)
        .arg(format!("--socket-path={}", s(socket)))
        .args(["-o", &format!("source={}", s(share))])
        .args(["-o", "cache=auto", "-o", "sandbox=chroot"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn virtiofsd");
    let t = Instant::now();
    while !socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "virtiofsd socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// With the knob set, QEMU's vhost-user-fs device is served by the external daemon: the
/// guest reads and writes the share through it, and the sandbox runs no server of its own
/// (no `vfs.sock` in its state directory). A knob that names no socket fails before boot.
#[test]
fn external_backend_knob_serves_the_workspace() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    std::fs::write(share.join("hello.txt"), "served-by-virtiofsd").expect("write");
    let ws = format!("{}:/workspace:host_fs", s(&share));
    let not_socket = tmp.path().join("plain-file");
    std::fs::write(&not_socket, "").expect("write");
    let o = e
        .cmd()
        .env(KNOB, &not_socket)
        .args([
            "run",
            "--image",
            IMAGE,
            "--workspace",
            "/workspace",
            "-v",
            &ws,
        ])
        .args(["--", "true"])
        .output()
        .expect("spawn");
    assert!(
        !o.status.success(),
        "a plain file was accepted as the socket"
    );
    assert!(stderr(&o).contains("not a unix socket"), "{}", stderr(&o));

    let socket = tmp.path().join("virtiofsd.sock");
    let mut daemon = virtiofsd(&share, &socket);
    let o = e
        .cmd()
        .env(KNOB, &socket)
        .args([
            "run",
            "--image",
            IMAGE,
            "-d",
            "--workspace",
            "/workspace",
            "-v",
            &ws,
        ])
        .output()
        .expect("spawn");
    assert!(o.status.success(), "run -d: {}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    let _g = e.guard(&id);
    let out = ok(&e.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /workspace/hello.txt; echo; echo guest-wrote > /workspace/back.txt",
    ]));
    assert!(out.contains("served-by-virtiofsd"), "{out}");
    assert_eq!(
        std::fs::read_to_string(share.join("back.txt")).expect("written through virtiofsd"),
        "guest-wrote\n"
    );
    let own: Vec<_> = walk(&e.state_dir())
        .into_iter()
        .filter(|p| p.ends_with("vfs.sock") && p.to_string_lossy().contains(&id))
        .collect();
    assert!(
        own.is_empty(),
        "the sandbox started its own server: {own:?}"
    );
    e.kill_and_rm(&id);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// Every path under `dir` (a few levels: the state directory is shallow).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            let p = entry.path();
            if depth < 4 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push((p.clone(), depth + 1));
            }
            out.push(p);
        }
    }
    out
}
