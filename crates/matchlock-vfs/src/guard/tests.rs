//! The guard over a real `PassthroughFs` on a temporary directory.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;
use crate::router::passthrough;

fn c(s: &str) -> CString {
    CString::new(s).expect("cstring")
}

fn guard(root: &std::path::Path, opts: GuardOptions) -> Guard {
    let g = Guard::new(passthrough(root).expect("passthrough"), opts);
    g.mount().expect("mount");
    g.init(FsOptions::empty()).expect("init");
    g
}

fn ctx() -> Context {
    Context {
        uid: 1234,
        gid: 1234,
        pid: 1,
    }
}

fn code(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn create_in(mode: u32) -> CreateIn {
    CreateIn {
        flags: u32::try_from(libc::O_RDWR).expect("flags"),
        mode,
        umask: 0,
        fuse_flags: 0,
    }
}

#[test]
fn names_devices_and_setid_bits() {
    let dir = tempfile::tempdir().expect("tmp");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    std::fs::write(dir.path().join("secret"), "host secret").expect("secret");
    let g = guard(&share, GuardOptions::default());
    assert_eq!(
        code(g.lookup(&ctx(), ROOT_ID, &c("..")).expect_err("..")),
        libc::EPERM
    );
    assert_eq!(
        code(g.lookup(&ctx(), ROOT_ID, &c(".")).expect_err(".")),
        libc::EPERM
    );
    assert_eq!(
        code(g.lookup(&ctx(), ROOT_ID, &c("a/b")).expect_err("/")),
        libc::EINVAL
    );
    assert_eq!(
        code(
            g.mkdir(&ctx(), ROOT_ID, &c(".."), 0o755, 0)
                .expect_err("mkdir ..")
        ),
        libc::EPERM
    );
    let dev = libc::S_IFCHR | 0o666;
    assert_eq!(
        code(
            g.mknod(&ctx(), ROOT_ID, &c("null"), dev, 0x103, 0)
                .expect_err("chr")
        ),
        libc::EPERM
    );
    let blk = libc::S_IFBLK | 0o666;
    assert_eq!(
        code(
            g.mknod(&ctx(), ROOT_ID, &c("sda"), blk, 0x800, 0)
                .expect_err("blk")
        ),
        libc::EPERM
    );
    assert!(!share.join("null").exists() && !share.join("sda").exists());
    g.mknod(&ctx(), ROOT_ID, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
        .expect("fifo allowed");

    let (e, ..) = g
        .create(
            &ctx(),
            ROOT_ID,
            &c("suid"),
            create_in(libc::S_IFREG | 0o6755),
        )
        .expect("create");
    let meta = std::fs::metadata(share.join("suid")).expect("meta");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o755,
        "setid bits stripped on create"
    );
    // Owned by this process's user, not the guest caller's uid 1234.
    let me = std::fs::metadata(dir.path()).expect("tmp meta").uid();
    assert_eq!(meta.uid(), me);
    let (mut attr, _) = g.getattr(&ctx(), e.inode, None).expect("getattr");
    attr.st_mode = libc::S_IFREG | 0o4711;
    g.setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE)
        .expect("chmod");
    let mode = std::fs::metadata(share.join("suid"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o711, "setid bits stripped on chmod");
    g.mkdir(&ctx(), ROOT_ID, &c("d"), 0o2775, 0).expect("mkdir");
    let mode = std::fs::metadata(share.join("d"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0, "setgid stripped on mkdir");
}

#[test]
fn symlinks_are_not_followed_on_the_host() {
    let dir = tempfile::tempdir().expect("tmp");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    std::fs::write(dir.path().join("secret"), "host secret").expect("secret");
    std::os::unix::fs::symlink(dir.path().join("secret"), share.join("abs")).expect("abs");
    std::os::unix::fs::symlink("../secret", share.join("rel")).expect("rel");
    let g = guard(&share, GuardOptions::default());
    for name in ["abs", "rel"] {
        let e = g.lookup(&ctx(), ROOT_ID, &c(name)).expect("lookup");
        assert_eq!(
            e.attr.st_mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} stays a symlink"
        );
        // Opening the link itself is refused (O_NOFOLLOW), never the host target.
        let flags = u32::try_from(libc::O_RDONLY).expect("flags");
        assert!(
            g.open(&ctx(), e.inode, flags, 0).is_err(),
            "{name} opened through"
        );
    }
}

#[test]
fn readonly_refuses_every_write() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("f"), "data").expect("f");
    std::fs::create_dir(dir.path().join("d")).expect("d");
    let g = guard(
        dir.path(),
        GuardOptions {
            readonly: true,
            ..GuardOptions::default()
        },
    );
    let f = g.lookup(&ctx(), ROOT_ID, &c("f")).expect("lookup").inode;
    let erofs = |r: io::Result<()>| assert_eq!(code(r.expect_err("write")), libc::EROFS);
    erofs(
        g.create(&ctx(), ROOT_ID, &c("n"), create_in(0o644))
            .map(|_| ()),
    );
    erofs(g.mkdir(&ctx(), ROOT_ID, &c("n"), 0o755, 0).map(|_| ()));
    erofs(
        g.mknod(&ctx(), ROOT_ID, &c("n"), libc::S_IFIFO | 0o644, 0, 0)
            .map(|_| ()),
    );
    erofs(g.unlink(&ctx(), ROOT_ID, &c("f")));
    erofs(g.rmdir(&ctx(), ROOT_ID, &c("d")));
    erofs(g.rename(&ctx(), ROOT_ID, &c("f"), ROOT_ID, &c("g"), 0));
    erofs(g.link(&ctx(), f, ROOT_ID, &c("h")).map(|_| ()));
    erofs(g.symlink(&ctx(), &c("f"), ROOT_ID, &c("s")).map(|_| ()));
    let (attr, _) = g.getattr(&ctx(), f, None).expect("getattr");
    erofs(
        g.setattr(&ctx(), f, attr, None, SetattrValid::SIZE)
            .map(|_| ()),
    );
    erofs(g.setxattr(&ctx(), f, &c("user.x"), b"v", 0));
    erofs(g.removexattr(&ctx(), f, &c("user.x")));
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_APPEND,
    ] {
        let flags = u32::try_from(flags).expect("flags");
        erofs(g.open(&ctx(), f, flags, 0).map(|_| ()));
    }
    let (h, ..) = g
        .open(&ctx(), f, u32::try_from(libc::O_RDONLY).expect("flags"), 0)
        .expect("read-only open");
    erofs(g.fallocate(&ctx(), f, h.unwrap_or(0), 0, 0, 10));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).expect("f"),
        "data"
    );
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 2);
}

#[test]
fn single_file_hides_its_directory() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("one"), "single").expect("one");
    std::fs::write(dir.path().join("other"), "hidden").expect("other");
    let g = Guard::new(
        passthrough(dir.path()).expect("passthrough"),
        GuardOptions {
            single_file: Some(c("one")),
            ..GuardOptions::default()
        },
    );
    let (root, _) = g.mount().expect("mount");
    assert_eq!(root.attr.st_mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(
        code(g.lookup(&ctx(), ROOT_ID, &c("other")).expect_err("dir")),
        libc::EPERM
    );
    assert_eq!(
        code(g.getattr(&ctx(), ROOT_ID, None).expect_err("dir attr")),
        libc::EPERM
    );
    assert!(
        g.lookup(&ctx(), root.inode, &c("other")).is_err(),
        "a file has no entries"
    );
    g.getattr(&ctx(), root.inode, None).expect("file attr");
}

#[test]
fn owner_override_is_what_the_guest_sees() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("f"), "data").expect("f");
    let g = guard(
        dir.path(),
        GuardOptions {
            owner_uid: Some(4242),
            owner_gid: Some(4343),
            ..GuardOptions::default()
        },
    );
    let (root, _) = g.mount().expect("mount");
    assert_eq!((root.attr.st_uid, root.attr.st_gid), (4242, 4343));
    let f = g.lookup(&ctx(), ROOT_ID, &c("f")).expect("lookup");
    assert_eq!((f.attr.st_uid, f.attr.st_gid), (4242, 4343));
    let (st, _) = g.getattr(&ctx(), f.inode, None).expect("getattr");
    assert_eq!((st.st_uid, st.st_gid), (4242, 4343));
    let d = g.mkdir(&ctx(), ROOT_ID, &c("d"), 0o755, 0).expect("mkdir");
    assert_eq!((d.attr.st_uid, d.attr.st_gid), (4242, 4343));
    // The host file keeps its real owner.
    let meta = std::fs::metadata(dir.path().join("d")).expect("d");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        std::fs::metadata(dir.path())
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .expect("dir")
    );
}

/// An unprivileged owner (simulated as 1234:1235 over files this root test process owns):
/// its files look like root's to the guest, root's look like the owner's, and a guest chown
/// to "root" maps back to the owner's ids on the host.
#[test]
fn owner_and_root_are_swapped_for_host_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let (uid, gid) = (1234, 1235);
    std::fs::write(dir.path().join("mine"), "m").expect("mine");
    std::fs::write(dir.path().join("roots"), "r").expect("roots");
    std::fs::write(dir.path().join("other"), "o").expect("other");
    std::os::unix::fs::chown(dir.path().join("mine"), Some(uid), Some(gid)).expect("chown");
    std::os::unix::fs::chown(dir.path().join("roots"), Some(0), Some(0)).expect("chown");
    std::os::unix::fs::chown(dir.path().join("other"), Some(777), Some(778)).expect("chown");
    let g = Guard::with_host_owner(
        passthrough(dir.path()).expect("passthrough"),
        GuardOptions::default(),
        Some((uid, gid)),
    );
    g.mount().expect("mount");
    g.init(FsOptions::empty()).expect("init");
    let ids = |name: &str| {
        let e = g.lookup(&ctx(), ROOT_ID, &c(name)).expect("lookup");
        (e.attr.st_uid, e.attr.st_gid)
    };
    assert_eq!(ids("mine"), (0, 0));
    assert_eq!(ids("roots"), (uid, gid));
    assert_eq!(ids("other"), (777, 778));
    // chown to what the guest sees as root: the host file goes to the owner's ids.
    let e = g.lookup(&ctx(), ROOT_ID, &c("other")).expect("lookup");
    let mut attr = e.attr;
    attr.st_uid = 0;
    attr.st_gid = 0;
    let (st, _) = g
        .setattr(
            &ctx(),
            e.inode,
            attr,
            None,
            SetattrValid::UID | SetattrValid::GID,
        )
        .expect("chown");
    assert_eq!((st.st_uid, st.st_gid), (0, 0));
    let meta = std::fs::metadata(dir.path().join("other")).expect("other");
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(swap_owner(swap_owner(42, uid), uid), 42);
}
