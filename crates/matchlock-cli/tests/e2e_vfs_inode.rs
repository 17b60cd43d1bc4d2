//! Workspace inode numbers end to end (issue 10, "stable inode numbers"; see
//! `matchlock_vfs::nested`): in a real VM, a `host_fs` workspace shows the host's `st_ino`,
//! so an index the host's git wrote stays valid in the guest (no re-read, no rewrite);
//! hard links share a number and a rename keeps it; the other providers and a second host
//! device show numbers that collide with nothing, so `cp -a` makes no false hard links.
//!
//! The risky case is built on purpose: two fresh tmpfs mounts (root mounts them under a
//! temporary directory and unmounts them on drop) number their files identically (1, 2,
//! 3, ...), on different devices, and both are mounted in the workspace next to a memory
//! mount (whose own numbers start at 1 too) and an overlay of a directory holding a hard
//! link pair. One VM (through `matchlock rpc`, the only way to ask for a memory mount)
//! serves every check. Needs root (the tmpfs mounts), as the suite's CI runs.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::rpc::{unb64, Rpc};
use common::{env, ok, stderr};
use serde_json::json;

const IMAGE: &str = "nettest:inode";
/// Numbers the mount tree keeps for itself (`matchlock_vfs::nested::HOST_INO_LIMIT`).
const OWN_BASE: u64 = 1 << 56;

/// A tmpfs mounted at a fresh directory; unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn new(path: PathBuf) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mount point");
        ok(&Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount (the test needs root)"));
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).expect("lstat").ino()
}

fn host_git(dir: &Path, home: &Path, args: &[&str]) -> String {
    ok(&Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=h@example.test", "-c", "user.name=host"])
        .args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("host git"))
}

/// A workspace tree the host's git commits: 300 files in 10 directories, a hard link pair,
/// a file to rename, and a `.gitignore` for the mount points inside the workspace.
fn host_repo(ws: &Path, home: &Path) {
    for d in 0..10 {
        let dir = ws.join(format!("src/d{d}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..30 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}\n")).expect("seed");
        }
    }
    std::fs::create_dir(ws.join("hl")).expect("mkdir");
    std::fs::write(ws.join("hl/a"), "linked\n").expect("seed");
    std::fs::hard_link(ws.join("hl/a"), ws.join("hl/b")).expect("link");
    std::fs::write(ws.join("ren"), "rename me\n").expect("seed");
    std::fs::write(ws.join(".gitignore"), "/ta/\n/tb/\n/mem/\n/ov/\n").expect("seed");
    // Files older than the index (by whole seconds): none is "racily clean", so only a
    // stat mismatch can make a git refresh the index.
    std::thread::sleep(Duration::from_millis(1100));
    host_git(ws, home, &["init", "-q", "-b", "main"]);
    host_git(ws, home, &["add", "-A"]);
    host_git(ws, home, &["commit", "-q", "-m", "tree"]);
    assert_eq!(host_git(ws, home, &["status", "--porcelain"]), "");
}

/// `script` (a shell command line; the `nettest` image has Debian's coreutils and git, and
/// busybox for `find`) in the RPC's sandbox: stdout, asserting success.
#[track_caller]
fn exec(r: &mut Rpc, id: &mut u64, script: &str) -> String {
    *id += 1;
    let v = r.call("exec", json!({ "command": script }), *id);
    assert_eq!(
        v["exit_code"],
        0,
        "{script}: {}{}",
        unb64(&v["stdout"]),
        unb64(&v["stderr"])
    );
    unb64(&v["stdout"])
}

/// The index file's bytes and modification time.
fn index_state(ws: &Path) -> (Vec<u8>, i64, i64) {
    let p = ws.join(".git/index");
    let m = std::fs::metadata(&p).expect("index");
    (std::fs::read(&p).expect("index"), m.mtime(), m.mtime_nsec())
}

#[test]
fn guest_sees_host_inode_numbers_git_agrees_and_nothing_collides() {
    let e = env();
    let archive = matchlock_test_support::nettest_image().expect("nettest image");
    let out = e.run_stdin(
        &["image", "import", IMAGE],
        &std::fs::read(archive).expect("read the nettest archive"),
    );
    assert!(out.status.success(), "import: {}", stderr(&out));

    let tmp = tempfile::tempdir().expect("tmp");
    let ws = tmp.path().join("ws");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&ws).expect("ws");
    std::fs::create_dir_all(&home).expect("home");
    host_repo(&ws, &home);
    let before = index_state(&ws);
    let ta = Tmpfs::new(tmp.path().join("ta"));
    let tb = Tmpfs::new(tmp.path().join("tb"));
    for t in [&ta, &tb] {
        for f in 0..10 {
            std::fs::write(t.path.join(format!("f{f}")), "t\n").expect("seed tmpfs");
        }
    }
    // The risky case: the same numbers on two devices.
    assert_eq!(ino(&ta.path.join("f3")), ino(&tb.path.join("f3")));
    assert_ne!(
        std::fs::metadata(&ta.path).expect("ta").dev(),
        std::fs::metadata(&tb.path).expect("tb").dev()
    );

    let mut r = Rpc::start().with_timeout(Duration::from_secs(300));
    let mounts = json!({
        "/workspace": {"type": "host_fs", "host_path": s(&ws)},
        "/workspace/ta": {"type": "host_fs", "host_path": s(&ta.path)},
        "/workspace/tb": {"type": "host_fs", "host_path": s(&tb.path)},
        "/workspace/mem": {"type": "memory"},
        "/workspace/ov": {"type": "overlay", "host_path": s(&ws.join("hl"))},
    });
    let created = r.call(
        "create",
        json!({"image": IMAGE, "vfs": {"workspace": "/workspace", "mounts": mounts}}),
        1,
    );
    assert!(created["id"].is_string(), "{created}");
    let mut id = 1;

    // git: the host's index is valid in the guest as it is.
    let status = exec(
        &mut r,
        &mut id,
        "cd /workspace && git status --porcelain && echo status-done",
    );
    assert_eq!(status, "status-done\n", "guest git status not clean");
    assert!(
        index_state(&ws) == before,
        "the guest's git status rewrote the host's index (it saw other stat data)"
    );

    // Times pass through to the nanosecond (git records them; Debian's git compares the
    // nanoseconds only in builds with USE_NSEC, so the index check alone would not show it).
    let times = "stat -c '%y|%z' src/d0/f0 hl/a .git/index";
    let guest = exec(&mut r, &mut id, &format!("cd /workspace && TZ=UTC {times}"));
    let host = ok(&Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && TZ=UTC {times}", s(&ws)))
        .output()
        .expect("host stat"));
    assert_eq!(guest, host, "mtime and ctime as the host has them");

    // The numbers themselves, hard links and a rename.
    let out = exec(
        &mut r,
        &mut id,
        "cd /workspace && stat -c %i . src src/d0/f0 hl/a hl/b ren && \
         mv ren src/ren2 && stat -c %i src/ren2",
    );
    let got: Vec<u64> = out.lines().map(|l| l.parse().expect("a number")).collect();
    let want = [
        ino(&ws),
        ino(&ws.join("src")),
        ino(&ws.join("src/d0/f0")),
        ino(&ws.join("hl/a")),
        ino(&ws.join("hl/a")),
        ino(&ws.join("src/ren2")),
        ino(&ws.join("src/ren2")),
    ];
    assert_eq!(got, want, "guest st_ino vs host st_ino");

    // No collisions anywhere in the tree (memory files made now).
    exec(
        &mut r,
        &mut id,
        "mkdir -p /workspace/mem/a && for i in 0 1 2 3 4 5 6 7 8 9; do echo m > /workspace/mem/a/m$i; done",
    );
    let listing = exec(
        &mut r,
        &mut id,
        "busybox find /workspace -path /workspace/.git -prune -o -print | \
         busybox xargs stat -c '%i %n'",
    );
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for l in listing.lines() {
        let (i, p) = l.split_once(' ').expect("ino path");
        by_ino
            .entry(i.parse().expect("a number"))
            .or_default()
            .push(p.to_string());
    }
    for (i, paths) in &mut by_ino {
        paths.sort();
        let own = [
            "/workspace/ta",
            "/workspace/tb",
            "/workspace/mem",
            "/workspace/ov",
        ]
        .iter()
        .any(|m| paths[0].starts_with(m));
        assert_eq!(own, *i >= OWN_BASE, "{paths:?}: {i:#x}");
        if paths.len() > 1 {
            assert_eq!(
                paths,
                &mut ["/workspace/hl/a", "/workspace/hl/b"],
                "only the host's hard links share a number"
            );
        }
    }
    assert!(by_ino.len() > 330, "{listing}");

    // `cp -a` links only what is linked.
    let linked = exec(
        &mut r,
        &mut id,
        "cp -a /workspace /tmp/copy && cd /tmp/copy && busybox find . -type f -links +1 | sort",
    );
    assert_eq!(linked, "./hl/a\n./hl/b\n", "cp -a made false hard links");

    assert_eq!(r.call("close", json!({}), 99), json!({}));
    assert!(r.finish().success());
}
