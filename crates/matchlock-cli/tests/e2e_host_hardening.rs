//! Host-side hardening through the real `matchlock` binary: private state and cache
//! directories, image caps from the environment, the static-guest check and the
//! confinement report of `diagnose`. No VM is booted here (the VM-level checks are in
//! `crates/matchlock-vm/tests/confine.rs`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use matchlock_test_support::{Entry, ImageSpec};

/// `matchlock` with a fresh HOME and cache, nothing else from the test environment.
fn cmd(exe: &Path, home: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env("HOME", home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env_remove("MATCHLOCK_GUEST_INIT")
        .env_remove("MATCHLOCK_MAX_LAYER_BYTES")
        .env_remove("MATCHLOCK_MAX_IMAGE_BYTES")
        .env_remove("MATCHLOCK_MAX_IMAGE_ENTRIES")
        .stdin(Stdio::null());
    c
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_matchlock"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

fn chmod(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
}

fn diagnose_json(c: &mut Command) -> serde_json::Value {
    let out = c
        .args(["diagnose", "--json"])
        .output()
        .expect("run diagnose");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn check<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {v}"))
}

#[test]
fn loose_state_cache_and_logs_are_tightened_on_open() {
    let home = tempfile::tempdir().expect("home");
    let state = home.path().join(".matchlock");
    let vm_logs = state.join("vms/vm-0000abcd/logs");
    let cache = home.path().join(".cache/matchlock");
    let images = cache.join("images");
    fs::create_dir_all(&vm_logs).expect("mkdir");
    fs::create_dir_all(&images).expect("mkdir");
    let dirs = [
        state.clone(),
        state.join("vms"),
        state.join("vms/vm-0000abcd"),
        vm_logs.clone(),
        cache.clone(),
        images.clone(),
    ];
    for d in &dirs {
        chmod(d, 0o755);
    }
    let files = [state.join("detach-1.log"), vm_logs.join("vm.log")];
    for f in &files {
        fs::write(f, "log").expect("write");
        chmod(f, 0o644);
    }
    // `list` opens the state database, `image ls` the image store.
    let out = cmd(&exe(), home.path()).arg("list").output().expect("list");
    assert!(out.status.success(), "{}", text(&out));
    let out = cmd(&exe(), home.path())
        .args(["image", "ls"])
        .output()
        .expect("image ls");
    assert!(out.status.success(), "{}", text(&out));
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&state.join("state.db")), 0o600);

    // Created from scratch by `diagnose`: private too.
    let fresh = tempfile::tempdir().expect("home");
    let _ = diagnose_json(&mut cmd(&exe(), fresh.path()));
    assert_eq!(mode(&fresh.path().join(".matchlock")), 0o700);
    assert_eq!(mode(&fresh.path().join(".cache/matchlock")), 0o700);
}

#[test]
fn image_caps_from_the_environment_refuse_a_gzip_bomb() {
    let home = tempfile::tempdir().expect("home");
    let mut spec = ImageSpec::new(vec![vec![Entry::file("bomb", vec![0u8; 8 << 20])]]);
    spec.gzip = true;
    let import = |limit: Option<&str>| {
        let mut c = cmd(&exe(), home.path());
        if let Some(l) = limit {
            c.env("MATCHLOCK_MAX_LAYER_BYTES", l);
        }
        let mut child = c
            .args(["image", "import", "bomb:test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn import");
        let mut stdin = child.stdin.take().expect("stdin");
        // A refused configuration exits before reading: a broken pipe is expected then.
        let _ = std::io::Write::write_all(&mut stdin, &spec.docker_save());
        drop(stdin);
        child.wait_with_output().expect("wait")
    };
    let out = import(Some("1048576"));
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("per-layer limit of 1048576 bytes")
            && msg.contains("MATCHLOCK_MAX_LAYER_BYTES"),
        "{msg}"
    );
    let images = home.path().join(".cache/matchlock/images");
    for d in ["layers/sha256", "rootfs", "tmp"] {
        let n = fs::read_dir(images.join(d)).map(|r| r.count()).unwrap_or(0);
        assert_eq!(n, 0, "{d} not empty after a refused import");
    }
    let out = import(Some("lots"));
    assert!(
        !out.status.success() && text(&out).contains("MATCHLOCK_MAX_LAYER_BYTES=\"lots\""),
        "{}",
        text(&out)
    );
    // The defaults (10 GiB per layer) take the same archive.
    let out = import(None);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn diagnose_rejects_a_dynamic_guest_and_finds_the_static_build() {
    let home = tempfile::tempdir().expect("home");
    // A cargo-like layout: target/release/matchlock with the dynamic workspace build of the
    // guest next to it, and the static one where scripts/build-guest.sh puts it.
    let target = home.path().join("target");
    let release = target.join("release");
    let static_dir = target.join("x86_64-unknown-linux-gnu/release");
    fs::create_dir_all(&release).expect("mkdir");
    fs::create_dir_all(&static_dir).expect("mkdir");
    let bin = release.join("matchlock");
    fs::copy(exe(), &bin).expect("copy matchlock");
    fs::copy("/bin/true", release.join("matchlock-guest")).expect("dynamic guest");

    // Only the dynamic candidate: fail, saying why and how to fix it.
    let v = diagnose_json(&mut cmd(&bin, home.path()));
    let g = check(&v, "guest-runtime");
    assert_eq!(g["status"], "fail", "{g}");
    let msg = g["message"].as_str().expect("message");
    assert!(msg.contains("dynamically linked"), "{msg}");
    assert!(g["fix"]
        .as_str()
        .expect("fix")
        .contains("scripts/build-guest.sh"));
    assert_eq!(v["ok"], false);

    // Pointing MATCHLOCK_GUEST_INIT at a dynamic binary fails the same way.
    let v = diagnose_json(cmd(&bin, home.path()).env("MATCHLOCK_GUEST_INIT", "/bin/true"));
    let g = check(&v, "guest-runtime");
    assert_eq!(g["status"], "fail", "{g}");
    assert!(g["message"]
        .as_str()
        .expect("message")
        .contains("dynamically linked"));

    // With the static build in place the dynamic one is skipped.
    let static_guest = static_dir.join("matchlock-guest");
    fs::copy("/bin/busybox", &static_guest).expect("static guest");
    let v = diagnose_json(&mut cmd(&bin, home.path()));
    let g = check(&v, "guest-runtime");
    assert_eq!(g["status"], "pass", "{g}");
    assert_eq!(g["message"], static_guest.display().to_string());
}

#[test]
fn diagnose_reports_helper_confinement() {
    let home = tempfile::tempdir().expect("home");
    let v = diagnose_json(&mut cmd(&exe(), home.path()));
    let c = check(&v, "confinement");
    let msg = c["message"].as_str().expect("message");
    // This project's machines have both (Debian QEMU with seccomp, Linux 6.x Landlock).
    assert_eq!(c["status"], "pass", "{c}");
    assert!(
        msg.starts_with("QEMU seccomp sandbox: yes; Landlock: ABI "),
        "{msg}"
    );
    let out = cmd(&exe(), home.path())
        .arg("diagnose")
        .output()
        .expect("diagnose");
    assert!(
        text(&out).contains("✓ confinement: QEMU seccomp sandbox: yes"),
        "{}",
        text(&out)
    );
}
