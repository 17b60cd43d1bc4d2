//! The workspace escape suite's remaining cases and the shared-directory semantics, through
//! real VMs (issue 10, "Tests"; `docs/threat-model.md`, *Workspace shares*): rename races by
//! the host while the guest walks the share, hard links, device nodes, FIFOs and sockets, `..`
//! from mount roots and synthesised directories, two sandboxes on one host directory, and
//! large files and directories. `e2e_workspace.rs` has the first half of the escape suite.
//!
//! The `nettest` image is used for its python3 (sockets, `O_EXCL`, `flock`, a fast walker);
//! every sandbox runs with `--no-network`.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env, ok, stderr, stdout, KillOnDrop};

/// How long the guest may cache names and attributes of host files
/// (`matchlock_vfs::router`'s `CACHE_TIMEOUT`).
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A detached nettest sandbox without a network, with `mounts` (`-v` specs) under
/// `/workspace`.
fn start(mounts: &[String]) -> (String, KillOnDrop<'static>) {
    let e = env();
    let image = nethost::nettest_image(e);
    let mut args = vec![
        "run",
        "--image",
        image,
        "-d",
        "--no-network",
        "--workspace",
        "/workspace",
    ];
    for m in mounts {
        args.extend(["-v", m.as_str()]);
    }
    let id = ok(&e.run(&args)).trim().to_string();
    assert!(id.starts_with("vm-"), "{id:?}");
    let guard = e.guard(&id);
    (id, guard)
}

/// `sh -c script` in `id`: (success, stdout, stderr).
fn sh(id: &str, script: &str) -> (bool, String, String) {
    let o = env().run(&["exec", id, "--", "sh", "-c", script]);
    (o.status.success(), stdout(&o), stderr(&o))
}

#[track_caller]
fn sh_ok(id: &str, script: &str) -> String {
    let (good, out, err) = sh(id, script);
    assert!(good, "{script}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// The guest's walker for the rename race: for `secs` seconds it walks the share (following
/// symlinks, in the guest's view), reads every file and a few fixed paths, appends to two of
/// them, and prints how often it saw each first line.
const WALKER: &str = r#"
import os, sys, time
end = time.time() + float(sys.argv[1]); seen = {}; n = 0
def note(b):
    k = b.split(b"\n")[0].decode(errors="replace")[:60]; seen[k] = seen.get(k, 0) + 1
def read(p):
    try:
        with open(p, "rb") as f: note(f.read(256))
    except OSError as e: note(b"ERR %d" % e.errno)
while time.time() < end:
    for root, dirs, files in os.walk("/workspace/race", followlinks=True):
        for f in files: read(os.path.join(root, f))
    for p in ("walk/inside.txt", "walk/secret.txt", "walk-x/secret.txt", "f", "f-x",
              "tree/deep/leaf.txt", "tree-moved/deep/leaf.txt", "rel-x"):
        read("/workspace/race/" + p)
    for p in ("f", "walk/secret.txt", "f-x"):
        try:
            with open("/workspace/race/" + p, "a") as f: f.write("PWNED\n")
        except OSError: pass
    n += 1
print("iterations", n)
for k, v in sorted(seen.items()): print(v, k)
"#;

/// Host-side swaps for the race, until `stop`: `walk` (a directory) <-> `walk-x` (a symlink to
/// the outside directory) and `f` (a file) <-> `f-x` (a symlink to the outside secret) by
/// atomic exchange, and `tree` renamed to `tree-moved` and back.
fn swapper(race: &Path, stop: &AtomicBool, swaps: &AtomicU64) {
    use nix::fcntl::{renameat2, RenameFlags};
    let xchg = |a: &str, b: &str| {
        renameat2(
            None,
            &race.join(a),
            None,
            &race.join(b),
            RenameFlags::RENAME_EXCHANGE,
        )
        .expect("exchange");
    };
    while !stop.load(Ordering::Relaxed) {
        xchg("walk", "walk-x");
        xchg("f", "f-x");
        std::fs::rename(race.join("tree"), race.join("tree-moved")).expect("rename");
        xchg("walk", "walk-x");
        xchg("f", "f-x");
        std::fs::rename(race.join("tree-moved"), race.join("tree")).expect("rename back");
        swaps.fetch_add(1, Ordering::Relaxed);
    }
}

/// (a) A host thread renames a directory and swaps symlinks to a secret outside the share in
/// and out of place while the guest walks, reads and appends: the secret never reaches the
/// guest, and the guest's writes never reach it.
#[test]
fn rename_races_never_reach_outside_the_share() {
    let tmp = tempfile::tempdir().expect("tmp");
    let share = tmp.path().join("share");
    let race = share.join("race");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(race.join("walk")).expect("walk");
    std::fs::create_dir_all(race.join("tree/deep")).expect("tree");
    std::fs::create_dir_all(&outside).expect("outside");
    let secret = format!("HOST-SECRET-{}", std::process::id());
    std::fs::write(outside.join("secret.txt"), format!("{secret}\n")).expect("secret");
    std::fs::write(race.join("walk/inside.txt"), "INSIDE-WALK\n").expect("inside");
    std::fs::write(race.join("f"), "INSIDE-FILE\n").expect("f");
    std::fs::write(race.join("tree/deep/leaf.txt"), "INSIDE-TREE\n").expect("leaf");
    std::os::unix::fs::symlink(&outside, race.join("walk-x")).expect("ln");
    std::os::unix::fs::symlink(outside.join("secret.txt"), race.join("f-x")).expect("ln");
    std::os::unix::fs::symlink("../../outside/secret.txt", race.join("rel-x")).expect("ln");
    let (id, _guard) = start(&[format!("{}:/workspace:host_fs", s(&share))]);
    // The outside path exists in the guest too, with other content: a symlink followed in
    // the guest's view reads this decoy.
    sh_ok(
        &id,
        &format!(
            "mkdir -p {o} && echo GUEST-DECOY > {o}/secret.txt && cat > /tmp/walker.py <<'EOF'\n{WALKER}\nEOF",
            o = s(&outside)
        ),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let host = {
        let (race, stop, swaps) = (race.clone(), stop.clone(), swaps.clone());
        std::thread::spawn(move || swapper(&race, &stop, &swaps))
    };
    let walked = env().run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "python3 /tmp/walker.py 4 > /tmp/py.out 2>&1 & \
         end=$(( $(date +%s) + 4 )); while [ $(date +%s) -lt $end ]; do \
           busybox find /workspace/race -exec cat {} + 2>&1; \
           cat /workspace/race/walk/secret.txt /workspace/race/f-x /workspace/race/walk-x/secret.txt 2>&1; \
         done > /tmp/sh.out; wait; cat /tmp/py.out; echo SHELL; sort /tmp/sh.out | uniq -c",
    ]);
    stop.store(true, Ordering::Relaxed);
    host.join().expect("swapper");
    let out = format!("{}{}", stdout(&walked), stderr(&walked));
    assert!(walked.status.success(), "{out}");
    eprintln!(
        "{} host swap rounds; guest saw:\n{out}",
        swaps.load(Ordering::Relaxed)
    );
    assert!(
        !out.contains(&secret),
        "the host secret reached the guest:\n{out}"
    );
    // The race really happened: the guest saw the directories and files, and the symlinks
    // (resolved in its own view, to the decoy).
    for want in ["INSIDE-WALK", "INSIDE-FILE", "INSIDE-TREE", "GUEST-DECOY"] {
        assert!(out.contains(want), "never saw {want}:\n{out}");
    }
    assert!(swaps.load(Ordering::Relaxed) > 100, "the host barely raced");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).expect("secret"),
        format!("{secret}\n"),
        "the guest wrote through a symlink to the host file"
    );
    assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 1);
}

/// Runs python `code` in the guest; returns its stdout (asserting success).
#[track_caller]
fn py(id: &str, code: &str) -> String {
    ok(&env().run(&["exec", id, "--", "python3", "-c", code]))
}

/// (b) hard links, (c) device nodes, FIFOs and sockets, (d) `..` from mount roots and from a
/// synthesised directory, in one VM with two host_fs shares and a nested read-only one.
#[test]
fn links_devices_fifos_sockets_and_dotdot() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    let other = tmp.path().join("other");
    let nested = tmp.path().join("nested");
    for d in [&repo, &other, &nested] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, "HOST-SECRET\n").expect("secret");
    std::fs::write(other.join("o.txt"), "other\n").expect("o");
    std::fs::write(nested.join("n.txt"), "nested\n").expect("n");
    std::os::unix::fs::symlink(&secret, repo.join("abs-link")).expect("ln");
    nix::unistd::mkfifo(
        &repo.join("host-fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    let host_sock = std::os::unix::net::UnixListener::bind(repo.join("host.sock")).expect("bind");
    host_sock.set_nonblocking(true).expect("nonblocking");
    let (id, _guard) = start(&[
        format!("{}:/workspace/repo:host_fs", s(&repo)),
        format!("{}:/workspace/other:host_fs", s(&other)),
        format!("{}:/workspace/.host/nested:ro", s(&nested)),
    ]);

    // (b) A hard link to a file outside the share: the guest kernel refuses it (another
    // filesystem); between two mounts of the workspace the router refuses it with EXDEV
    // (each operation stays inside one provider), so `mv` falls back to copying.
    let (good, _, err) = sh(&id, "ln /etc/passwd /workspace/repo/passwd");
    assert!(!good && err.contains("Invalid cross-device link"), "{err}");
    let (good, _, err) = sh(&id, "ln /workspace/other/o.txt /workspace/repo/o-link");
    assert!(!good && err.contains("Invalid cross-device link"), "{err}");
    assert!(!repo.join("passwd").exists() && !repo.join("o-link").exists());
    assert_eq!(
        std::fs::metadata(other.join("o.txt")).expect("o").nlink(),
        1
    );
    // A hard link to a symlink pointing outside links the symlink, never its target; `ln -L`
    // resolves it in the guest's view (no such file there).
    sh_ok(
        &id,
        "ln /workspace/repo/abs-link /workspace/repo/hard-to-link",
    );
    let (good, _, _) = sh(
        &id,
        "ln -L /workspace/repo/abs-link /workspace/repo/followed",
    );
    assert!(!good, "ln -L reached the host target");
    let m = std::fs::symlink_metadata(repo.join("hard-to-link")).expect("hard link");
    assert!(m.file_type().is_symlink() && m.nlink() == 2, "{m:?}");
    assert_eq!(std::fs::metadata(&secret).expect("secret").nlink(), 1);
    assert!(!repo.join("followed").exists());

    // (c) Device nodes: char and block are refused, nothing lands on the host.
    for (name, spec) in [("blk", "b 8 0"), ("chr", "c 1 3")] {
        let (good, _, err) = sh(&id, &format!("mknod /workspace/repo/{name} {spec}"));
        assert!(
            !good && err.contains("Operation not permitted"),
            "{name}: {err}"
        );
        assert!(!repo.join(name).exists(), "{name} reached the host");
    }
    // FIFOs: created on the host as FIFOs, but data through them stays in the guest kernel;
    // a host reader of the same FIFO gets nothing, and a guest writer with no guest reader
    // blocks in the guest without stalling the owner.
    let out = sh_ok(
        &id,
        "cd /workspace/repo && mkfifo g-fifo && (cat g-fifo > /tmp/got &) && \
         echo through-guest-fifo > g-fifo && sleep 0.5 && cat /tmp/got",
    );
    assert_eq!(out, "through-guest-fifo\n");
    assert!(std::fs::symlink_metadata(repo.join("g-fifo"))
        .expect("fifo")
        .file_type()
        .is_fifo());
    let mut host_reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(repo.join("host-fifo"))
        .expect("open host fifo");
    let (good, _, _) = sh(
        &id,
        "timeout 2 sh -c 'echo into-host-fifo > /workspace/repo/host-fifo'",
    );
    assert!(!good, "a guest writer found a reader for the host's FIFO");
    let mut buf = Vec::new();
    let _ = host_reader.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "guest data reached a host FIFO reader: {buf:?}"
    );
    // Sockets: a guest bind makes a socket inode on the host that no host process can reach
    // (and guest clients reach the guest's listener); the host's listening socket in the
    // share is not reachable from the guest.
    let out = py(
        &id,
        "import socket\n\
         s = socket.socket(socket.AF_UNIX); s.bind('/workspace/repo/g.sock'); s.listen()\n\
         c = socket.socket(socket.AF_UNIX); c.connect('/workspace/repo/g.sock'); print('guest-local ok')\n\
         h = socket.socket(socket.AF_UNIX)\n\
         try:\n    h.connect('/workspace/repo/host.sock'); print('REACHED HOST')\n\
         except OSError as e: print('host socket:', e.errno)\n",
    );
    assert!(out.contains("guest-local ok"), "{out}");
    assert!(
        out.contains(&format!("host socket: {}", libc::ECONNREFUSED)),
        "{out}"
    );
    assert!(std::fs::symlink_metadata(repo.join("g.sock"))
        .expect("sock")
        .file_type()
        .is_socket());
    let refused = std::os::unix::net::UnixStream::connect(repo.join("g.sock"))
        .expect_err("a host client reached the guest's socket");
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::ECONNREFUSED),
        "{refused}"
    );
    assert!(
        host_sock.accept().is_err(),
        "the guest connected to the host's socket"
    );

    // (d) `..` from a mount root and from a synthesised directory stays in the guest's view:
    // the workspace, then the guest's own root (its image's os-release), never the host's
    // parent of a share.
    let out = sh_ok(
        &id,
        "ls -a /workspace/repo/..; echo --; ls -a /workspace/.host/nested/..; echo --; \
         ls -a /workspace/.host/..; echo --; realpath /workspace/.host/nested/../..; \
         cd -P /workspace/repo/../.. && pwd -P; head -1 /workspace/repo/../../etc/os-release; \
         head -1 /workspace/.host/nested/../../../etc/os-release; \
         cat /workspace/repo/../secret.txt /workspace/.host/nested/../secret.txt 2>&1; true",
    );
    let sections: Vec<&str> = out.split("--\n").collect();
    assert_eq!(sections.len(), 4, "{out}");
    let names = |sec: &str| {
        let mut v: Vec<String> = sec
            .lines()
            .filter(|l| *l != "." && *l != "..")
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(sections[0]), [".host", "other", "repo"], "{out}");
    assert_eq!(names(sections[1]), ["nested"], "{out}");
    assert_eq!(names(sections[2]), [".host", "other", "repo"], "{out}");
    assert!(sections[3].starts_with("/workspace\n/\n"), "{out}");
    assert_eq!(
        sections[3]
            .matches("NAME=\"Matchlock network test image\"")
            .count(),
        2,
        "{out}"
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
}

/// Two sandboxes on one host directory (both host_fs, running at once): a write by one is
/// visible to the other within the attribute/entry cache timeout, an `O_EXCL` lock file made
/// by one stops the other, and `flock` locks are per sandbox (documented limit).
#[test]
fn two_sandboxes_share_one_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("shared"), "v1\n").expect("v1");
    let spec = format!("{}:/workspace:host_fs", s(&share));
    let (a, _ga) = start(std::slice::from_ref(&spec));
    let (b, _gb) = start(&[spec]);

    // B caches `shared` (attributes: size 3) and polls, without forking, for A's longer
    // content and new file; it reports what it saw by creating `b-saw`.
    let poll = {
        let b = b.clone();
        std::thread::spawn(move || {
            env().run(&[
                "exec", &b, "--", "python3", "-c",
                "import os, time\n\
                 open('/workspace/shared').read(); open('/workspace/b-ready', 'w').close()\n\
                 end = time.time() + 20; stale = 0\n\
                 while time.time() < end:\n\
                 \x20   if open('/workspace/shared').read() == 'v2-longer-content\\n' \\\n\
                 \x20           and os.path.exists('/workspace/from-a'):\n\
                 \x20       open('/workspace/b-saw', 'w').close(); print('stale reads', stale); break\n\
                 \x20   stale += 1\n\
                 else: raise SystemExit('never saw the write')\n",
            ])
        })
    };
    matchlock_test_support::wait_until(Duration::from_secs(60), "B read the file", || {
        share.join("b-ready").exists()
    })
    .expect("B ready");
    sh_ok(
        &a,
        "printf 'v2-longer-content\\n' > /workspace/shared && echo a > /workspace/from-a",
    );
    let written = Instant::now();
    let bound = CACHE_TIMEOUT + Duration::from_secs(2);
    // A tight poll: the measured delay is B's, not a back-off's.
    while !share.join("b-saw").exists() && written.elapsed() < bound + Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let delay = written.elapsed();
    let polled = poll.join().expect("poll");
    let out = ok(&polled);
    eprintln!(
        "B saw A's write {delay:?} after A's exec returned ({})",
        out.trim()
    );
    assert!(
        delay < bound,
        "B saw A's write only after {delay:?} (bound {bound:?})"
    );

    // O_EXCL: A's lock file stops B; after A removes it B gets it (once B's cached entry for
    // the name expires, within the cache timeout).
    let excl = "import os, sys, time\n\
                end = time.time() + float(sys.argv[1])\n\
                while True:\n\
                \x20   try:\n\
                \x20       fd = os.open('/workspace/lock', os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n\
                \x20       os.write(fd, sys.argv[2].encode()); print('got'); break\n\
                \x20   except FileExistsError:\n\
                \x20       if time.time() > end: print('exists'); break\n\
                \x20       time.sleep(0.05)\n";
    let lock = |id: &str, wait: &str, who: &str| {
        ok(&env().run(&["exec", id, "--", "python3", "-c", excl, wait, who]))
    };
    assert_eq!(lock(&a, "0", "A"), "got\n");
    assert_eq!(lock(&b, "0", "B"), "exists\n", "B took A's O_EXCL lock");
    assert_eq!(
        std::fs::read_to_string(share.join("lock")).expect("lock"),
        "A"
    );
    sh_ok(&a, "rm /workspace/lock");
    let t = Instant::now();
    assert_eq!(lock(&b, "5", "B"), "got\n");
    eprintln!("B took the released lock after {:?}", t.elapsed());
    assert_eq!(
        std::fs::read_to_string(share.join("lock")).expect("lock"),
        "B"
    );

    // flock is kept by each guest kernel: a lock held in A does not stop B (a documented
    // limit; O_EXCL lock files, as git uses, are the cross-sandbox mechanism).
    let holder = {
        let a = a.clone();
        std::thread::spawn(move || {
            env().run(&[
                "exec",
                &a,
                "--",
                "python3",
                "-c",
                "import fcntl, os, time\n\
                 fd = os.open('/workspace/flk', os.O_CREAT | os.O_RDWR)\n\
                 fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); open('/workspace/a-holds', 'w')\n\
                 time.sleep(6)\n",
            ])
        })
    };
    matchlock_test_support::wait_until(Duration::from_secs(30), "A holds flock", || {
        share.join("a-holds").exists()
    })
    .expect("A holds the lock");
    let out = py(
        &b,
        "import fcntl, os\n\
         fd = os.open('/workspace/flk', os.O_RDWR)\n\
         try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('B locked too')\n\
         except BlockingIOError: print('B blocked')\n",
    );
    assert_eq!(
        out, "B locked too\n",
        "flock is now shared across sandboxes: update the docs"
    );
    ok(&holder.join().expect("holder"));
}

/// Large: a write past 4 GiB in a sparse file and a host write past 5 GiB both read back on
/// the other side; a directory of 100,000 host entries is listed by the guest exactly once.
#[test]
fn large_offsets_and_a_hundred_thousand_entries() {
    const ENTRIES: usize = 100_000;
    const FOUR_G: u64 = 4 << 30;
    let tmp = tempfile::tempdir().expect("tmp");
    let share = tmp.path().join("share");
    let many = share.join("many");
    std::fs::create_dir_all(&many).expect("many");
    // The entries are hard links to a few files beside the directory (what is listed is the
    // directory's names; links keep the host's setup to a few seconds on a busy disk).
    let t = Instant::now();
    let targets: Vec<_> = (0..4).map(|i| share.join(format!("target{i}"))).collect();
    for target in &targets {
        std::fs::write(target, "").expect("target");
    }
    let mut names: Vec<String> = (1..=ENTRIES).map(|i| format!("f{i:06}")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::hard_link(&targets[i % targets.len()], many.join(n)).expect("link");
    }
    eprintln!("host made {ENTRIES} entries in {:?}", t.elapsed());
    let host_big = std::fs::File::create(share.join("host-big")).expect("host-big");
    host_big
        .write_all_at(b"HOST-5G", (5 << 30) + 3)
        .expect("write at 5 GiB");
    let (id, _guard) = start(&[format!("{}:/workspace:host_fs", s(&share))]);

    let out = sh_ok(
        &id,
        &format!(
            "cd /workspace && printf MARK-4G | dd of=big bs=1 seek={FOUR_G} conv=notrunc 2>/dev/null && \
             dd if=big bs=1 skip={FOUR_G} count=7 2>/dev/null; echo; stat -c %s big host-big; \
             dd if=host-big bs=1 skip=$(( (5 << 30) + 3 )) count=7 2>/dev/null; echo"
        ),
    );
    assert_eq!(
        out,
        format!("MARK-4G\n{}\n{}\nHOST-5G\n", FOUR_G + 7, (5u64 << 30) + 10),
        "guest view of the large files"
    );
    let big = std::fs::File::open(share.join("big")).expect("big");
    let meta = big.metadata().expect("meta");
    assert_eq!(meta.len(), FOUR_G + 7, "apparent size on the host");
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "the hole was allocated: {meta:?}"
    );
    let mut at = [0u8; 7];
    big.read_exact_at(&mut at, FOUR_G).expect("read at 4 GiB");
    assert_eq!(&at, b"MARK-4G");

    names.sort();
    let mut expected = names.join("\n");
    expected.push('\n');
    let want = sha256(expected.as_bytes());
    let t = Instant::now();
    let out = sh_ok(
        &id,
        "cd /workspace/many && ls -f | wc -l && ls -f | LC_ALL=C sort | sha256sum | cut -d' ' -f1",
    );
    eprintln!("guest listed {ENTRIES} entries twice in {:?}", t.elapsed());
    assert_eq!(out, format!("{ENTRIES}\n{want}\n"), "the guest's listing");
}

/// The host's `sha256sum` of `data` (hex).
fn sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    let out = ok(&child.wait_with_output().expect("sha256sum"));
    out.split_whitespace().next().expect("hash").to_string()
}
