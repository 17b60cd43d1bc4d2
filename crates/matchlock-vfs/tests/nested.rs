//! Nested mounts through the real router (`matchlock_vfs::build`: host_fs over a real host
//! directory, memory, overlay) driven through the FUSE filesystem trait as the virtio-fs
//! server drives it, with and without the interception layer on top.

mod provider_harness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::{FsOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use matchlock_api::{MountConfig, VfsConfig};
use matchlock_vfs::intercept::{
    rules::RuleWire, FileEvent, Intercept, InterceptionWire, Op, Rules,
};
use matchlock_vfs::router::{build, Router};
use provider_harness::{
    c, contents, create, errno, getattr, lookup, mkdir, rename, root, write, Fs, ROOT,
};

const RW: u32 = (libc::O_CREAT | libc::O_RDWR) as u32;

fn mount(kind: &str, host: &Path) -> MountConfig {
    MountConfig {
        kind: kind.into(),
        host_path: host.to_string_lossy().into_owned(),
        ..MountConfig::default()
    }
}

struct Setup {
    host: tempfile::TempDir,
    _scratch: tempfile::TempDir,
    router: Router,
}

/// `/ws` host_fs over a directory holding a file `sub`, a directory `a` (with `a/keep`) and
/// `top.txt`; `/ws/sub` memory (over the outer's file of that name); `/ws/a/b/c` memory
/// (`a` is real, `b` is not); `/ws/x/y` overlay of `a` (`x` is synthesised).
fn setup() -> Setup {
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("sub"), b"outer file").expect("seed");
    std::fs::create_dir(host.path().join("a")).expect("seed");
    std::fs::write(host.path().join("a/keep"), b"keep").expect("seed");
    std::fs::write(host.path().join("top.txt"), b"top").expect("seed");
    let mut cfg = VfsConfig {
        workspace: "/ws".into(),
        ..VfsConfig::default()
    };
    cfg.mounts
        .insert("/ws".into(), mount("host_fs", host.path()));
    cfg.mounts
        .insert("/ws/sub".into(), mount("memory", host.path()));
    cfg.mounts
        .insert("/ws/a/b/c".into(), mount("memory", host.path()));
    cfg.mounts
        .insert("/ws/x/y".into(), mount("overlay", &host.path().join("a")));
    let scratch = tempfile::tempdir().expect("scratch");
    matchlock_vfs::router::preflight(&cfg).expect("preflight");
    let router = build(&cfg, scratch.path()).expect("nested mounts build");
    router
        .init(FsOptions::ASYNC_READ | FsOptions::DO_READDIRPLUS)
        .expect("init");
    Setup {
        host,
        _scratch: scratch,
        router,
    }
}

/// Lists a directory through an open handle (host directories need one) with `readdir`
/// calls of at most `batch` entries each, resuming from the last cookie like the kernel;
/// returns the names without `.` and `..`, sorted.
fn ls(fs: &Fs, ino: u64, batch: usize) -> Vec<String> {
    let (h, _) = fs.opendir(&root(), ino, 0).expect("opendir");
    let h = h.unwrap_or(0);
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut got = 0;
        fs.readdir(&root(), ino, h, 4096, offset, &mut |d| {
            if got == batch {
                return Ok(0);
            }
            got += 1;
            offset = d.offset;
            if d.name != b"." && d.name != b".." {
                out.push(String::from_utf8_lossy(d.name).into_owned());
            }
            Ok(1)
        })
        .expect("readdir");
        if got == 0 {
            break;
        }
    }
    fs.releasedir(&root(), ino, 0, h).expect("releasedir");
    out.sort();
    out
}

fn names(fs: &Fs, ino: u64) -> Vec<String> {
    ls(fs, ino, 64)
}

fn is_dir(fs: &Fs, ino: u64) -> bool {
    getattr(fs, ino).st_mode & libc::S_IFMT == libc::S_IFDIR
}

#[test]
fn inner_mount_shadows_the_outer_entry_and_keeps_its_writes() {
    let s = setup();
    let fs: &Fs = &s.router;
    let sub = lookup(fs, ROOT, "sub").expect("lookup sub");
    assert!(
        is_dir(fs, sub.inode),
        "the memory mount, not the outer's file"
    );
    assert_eq!(names(fs, sub.inode), Vec::<String>::new());
    let (f, fh) = create(fs, sub.inode, "f", 0o644, RW).expect("create in the inner mount");
    write(fs, f.inode, fh, 0, b"inner").expect("write");
    assert_eq!(contents(fs, f.inode), b"inner");
    // The write went to memory: the host still has its own file `sub`, unchanged.
    assert_eq!(
        std::fs::read(s.host.path().join("sub")).expect("host file"),
        b"outer file"
    );
    // The outer's other entries are served by the outer.
    let top = lookup(fs, ROOT, "top.txt").expect("outer file");
    assert_eq!(getattr(fs, top.inode).st_size, 3);
    // Inode numbers are unique across the providers.
    let a = lookup(fs, ROOT, "a").expect("a");
    let keep = lookup(fs, a.inode, "keep").expect("keep");
    let mut seen = std::collections::HashSet::new();
    for ino in [ROOT, sub.inode, f.inode, top.inode, a.inode, keep.inode] {
        assert!(seen.insert(ino), "inode {ino:#x} handed out twice");
    }
    assert_ne!(
        sub.inode >> 56,
        top.inode >> 56,
        "different providers, different slots"
    );
}

#[test]
fn intermediate_directories_real_where_the_outer_has_them_synthesised_elsewhere() {
    let s = setup();
    let fs: &Fs = &s.router;
    // `a` exists in the outer: shown as it is, its own entries included, with `b` on top.
    let a = lookup(fs, ROOT, "a").expect("a");
    assert_eq!(names(fs, a.inode), ["b", "keep"]);
    let b = lookup(fs, a.inode, "b").expect("b is synthesised");
    let battr = getattr(fs, b.inode);
    assert_eq!(battr.st_mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!((battr.st_uid, battr.st_gid), (0, 0));
    let cdir = lookup(fs, b.inode, "c").expect("c is the inner mount");
    let (f, fh) = create(fs, cdir.inode, "deep", 0o644, RW).expect("create deep");
    write(fs, f.inode, fh, 0, b"deep").expect("write");
    assert!(
        !s.host.path().join("a/b").exists(),
        "nothing reached the host"
    );
    // `x` is not in the outer: synthesised, and the overlay below it shows `a`'s files.
    let x = lookup(fs, ROOT, "x").expect("x");
    let y = lookup(fs, x.inode, "y").expect("y");
    assert_eq!(names(fs, y.inode), ["keep"]);
    // The root lists every mount point and intermediate name once, beside the outer's own.
    assert_eq!(names(fs, ROOT), ["a", "sub", "top.txt", "x"]);
    // Paged listings (one entry per call) resume across the tree's own entries and the
    // provider's, and still show each name once.
    assert_eq!(ls(fs, ROOT, 1), ["a", "sub", "top.txt", "x"]);
}

#[test]
fn readdirplus_and_dotdot_name_the_outer_directory() {
    let s = setup();
    let fs: &Fs = &s.router;
    let sub = lookup(fs, ROOT, "sub").expect("sub");
    let mut dotdot = None;
    let mut plus: HashMap<String, u64> = HashMap::new();
    let (h, _) = fs.opendir(&root(), ROOT, 0).expect("opendir");
    fs.readdirplus(&root(), ROOT, h.unwrap_or(0), 4096, 0, &mut |d, e| {
        plus.insert(String::from_utf8_lossy(d.name).into_owned(), e.inode);
        Ok(1)
    })
    .expect("readdirplus of the root");
    assert_eq!(
        plus.get("sub"),
        Some(&sub.inode),
        "the mount root, not the outer's file"
    );
    let (h, _) = fs.opendir(&root(), sub.inode, 0).expect("opendir");
    fs.readdir(&root(), sub.inode, h.unwrap_or(0), 4096, 0, &mut |d| {
        if d.name == b".." {
            dotdot = Some(d.ino);
        }
        Ok(1)
    })
    .expect("readdir of the inner root");
    assert_eq!(
        dotdot,
        Some(getattr(fs, ROOT).st_ino),
        "`..` of the inner root is the outer directory (its number as the guest sees it)"
    );
}

#[test]
fn mount_points_cannot_be_replaced_and_nothing_moves_between_providers() {
    let s = setup();
    let fs: &Fs = &s.router;
    let sub = lookup(fs, ROOT, "sub").expect("sub");
    let a = lookup(fs, ROOT, "a").expect("a");
    let (f, _) = create(fs, sub.inode, "f", 0o644, RW).expect("create");
    assert_eq!(
        errno(rename(fs, sub.inode, "f", ROOT, "moved", 0)),
        libc::EXDEV
    );
    assert_eq!(
        errno(fs.link(&root(), f.inode, ROOT, &c("linked"))),
        libc::EXDEV
    );
    assert_eq!(errno(fs.rmdir(&root(), ROOT, &c("sub"))), libc::EBUSY);
    assert_eq!(errno(fs.unlink(&root(), ROOT, &c("sub"))), libc::EBUSY);
    assert_eq!(errno(rename(fs, ROOT, "a", ROOT, "a2", 0)), libc::EBUSY);
    assert_eq!(
        errno(rename(fs, ROOT, "top.txt", ROOT, "sub", 0)),
        libc::EBUSY
    );
    assert_eq!(errno(mkdir(fs, ROOT, "x")), libc::EEXIST);
    assert_eq!(errno(mkdir(fs, a.inode, "b")), libc::EEXIST);
    // Inside one provider everything still works.
    rename(fs, sub.inode, "f", sub.inode, "g", 0).expect("rename inside the mount");
    mkdir(fs, a.inode, "new").expect("mkdir beside the intermediate name");
    assert!(s.host.path().join("a/new").is_dir());
}

#[test]
fn forgotten_intermediate_directories_are_learnt_again() {
    let s = setup();
    let fs: &Fs = &s.router;
    for _ in 0..3 {
        let a = lookup(fs, ROOT, "a").expect("a");
        let b = lookup(fs, a.inode, "b").expect("b");
        let cdir = lookup(fs, b.inode, "c").expect("c");
        assert!(is_dir(fs, cdir.inode));
        fs.forget(&root(), cdir.inode, 1);
        fs.forget(&root(), b.inode, 1);
        fs.forget(&root(), a.inode, 1);
    }
}

#[test]
fn interception_sees_full_guest_paths_inside_inner_mounts() {
    let s = setup();
    let Setup { router, host, .. } = s;
    let rules = Rules::compile(&InterceptionWire {
        emit_events: true,
        rules: vec![RuleWire {
            name: "no secrets deep".into(),
            phase: "before".into(),
            ops: vec!["create".into()],
            path: "/ws/a/b/c/secret*".into(),
            action: "block".into(),
            timeout_ms: 0,
        }],
    })
    .expect("compiles")
    .expect("engine");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    let sink = Arc::new(move |e: FileEvent| sink_events.lock().expect("lock").push(e));
    let fs = Intercept::new(router, rules, "/ws", Some(sink));
    let ctx = Context::new();
    let a = fs.lookup(&ctx, ROOT, &c("a")).expect("a");
    let b = fs.lookup(&ctx, a.inode, &c("b")).expect("b");
    let cdir = fs.lookup(&ctx, b.inode, &c("c")).expect("c");
    let fs_dyn: &Fs = &fs;
    assert_eq!(
        errno(create(fs_dyn, cdir.inode, "secret.txt", 0o644, RW)),
        libc::EPERM
    );
    create(fs_dyn, cdir.inode, "open.txt", 0o644, RW).expect("allowed create");
    let sub = fs.lookup(&ctx, ROOT, &c("sub")).expect("sub");
    create(fs_dyn, sub.inode, "secret.txt", 0o644, RW).expect("rule is for /ws/a/b/c only");
    let events = events.lock().expect("lock");
    let created: Vec<&str> = events
        .iter()
        .filter(|e| e.op == Op::Create)
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(created, ["/ws/a/b/c/open.txt", "/ws/sub/secret.txt"]);
    drop(host);
}

/// Synthesised directories (the workspace root with no mount of its own, and `x` on the
/// way to `/ws/x/y`) are 0755 root-owned and read-only: every write path is `EROFS`.
#[test]
fn synthesised_directories_are_0755_root_and_read_only() {
    let host = tempfile::tempdir().expect("host");
    let mut cfg = VfsConfig {
        workspace: "/ws".into(),
        ..VfsConfig::default()
    };
    cfg.mounts
        .insert("/ws/x/y".into(), mount("memory", host.path()));
    let scratch = tempfile::tempdir().expect("scratch");
    let router = build(&cfg, scratch.path()).expect("build");
    router.init(FsOptions::empty()).expect("init");
    let fs: &Fs = &router;
    let x = lookup(fs, ROOT, "x").expect("x");
    for ino in [ROOT, x.inode] {
        let st = getattr(fs, ino);
        assert_eq!(st.st_mode, libc::S_IFDIR | 0o755, "mode of {ino:#x}");
        assert_eq!((st.st_uid, st.st_gid), (0, 0));
        assert_eq!(errno(mkdir(fs, ino, "d")), libc::EROFS);
        assert_eq!(errno(create(fs, ino, "f", 0o644, RW)), libc::EROFS);
        assert_eq!(
            errno(fs.symlink(&root(), &c("t"), ino, &c("l"))),
            libc::EROFS
        );
        assert_eq!(
            errno(fs.mknod(&root(), ino, &c("p"), libc::S_IFIFO | 0o644, 0, 0)),
            libc::EROFS
        );
        assert_eq!(errno(fs.unlink(&root(), ino, &c("zz"))), libc::EROFS);
        let mut attr = st;
        attr.st_mode = 0o777;
        assert_eq!(
            errno(fs.setattr(&root(), ino, attr, None, SetattrValid::MODE)),
            libc::EROFS
        );
        assert_eq!(
            errno(fs.access(&root(), ino, libc::W_OK as u32)),
            libc::EROFS
        );
        fs.access(&root(), ino, (libc::R_OK | libc::X_OK) as u32)
            .expect("readable and searchable");
    }
    assert_eq!(errno(rename(fs, ROOT, "x", ROOT, "x2", 0)), libc::EROFS);
    assert_eq!(names(fs, ROOT), ["x"]);
    // The mount below is writable as usual.
    let y = lookup(fs, x.inode, "y").expect("y");
    mkdir(fs, y.inode, "ok").expect("mkdir in the mount");
}

/// FLUSH is answered `ENOSYS` for every provider (the guest kernel then stops sending it, one
/// round trip less per `close`), and what was written is there without it.
#[test]
fn flush_is_enosys_for_every_provider() {
    let s = setup();
    let fs: &Fs = &s.router;
    let (f, fh) = create(fs, ROOT, "flushed.txt", 0o644, RW).expect("create on host_fs");
    assert_eq!(errno(fs.flush(&root(), f.inode, fh, 0)), libc::ENOSYS);
    assert!(s.host.path().join("flushed.txt").is_file());
    let sub = lookup(fs, ROOT, "sub").expect("memory mount");
    let (m, mh) = create(fs, sub.inode, "m", 0o644, RW).expect("create in memory");
    write(fs, m.inode, mh, 0, b"data").expect("write");
    assert_eq!(errno(fs.flush(&root(), m.inode, mh, 0)), libc::ENOSYS);
    assert_eq!(contents(fs, m.inode), b"data");
    let x = lookup(fs, ROOT, "x").expect("synthesised directory");
    let y = lookup(fs, x.inode, "y").expect("overlay mount");
    let keep = lookup(fs, y.inode, "keep").expect("overlay file");
    let (kh, _, _) = fs
        .open(&root(), keep.inode, libc::O_RDONLY as u32, 0)
        .expect("open in overlay");
    assert_eq!(
        errno(fs.flush(&root(), keep.inode, kh.unwrap_or(0), 0)),
        libc::ENOSYS
    );
}
