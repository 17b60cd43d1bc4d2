//! The inode numbers the guest sees through the real router (`matchlock_vfs::build`):
//! `host_fs` entries on the tree's host device show the host's `st_ino` (what the host's
//! `git` records in its index), everything else shows numbers of the tree's own at or above
//! `HOST_INO_LIMIT`, so nothing collides in the guest's one-device view; node ids stay the
//! tree's. Driven through the FUSE filesystem trait as the virtio-fs server drives it.

mod provider_harness;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::FileSystem;
use matchlock_api::{MountConfig, VfsConfig};
use matchlock_vfs::nested::HOST_INO_LIMIT;
use matchlock_vfs::router::{build, Router};
use provider_harness::{getattr, lookup, mkdir, rename, root, Fs, ROOT};

fn mount(kind: &str, host: &Path) -> MountConfig {
    MountConfig {
        kind: kind.into(),
        host_path: host.to_string_lossy().into_owned(),
        ..MountConfig::default()
    }
}

fn router(mounts: &[(&str, MountConfig)]) -> (Router, tempfile::TempDir) {
    let mut cfg = VfsConfig {
        workspace: "/ws".into(),
        ..VfsConfig::default()
    };
    for (guest, m) in mounts {
        cfg.mounts.insert((*guest).into(), m.clone());
    }
    let scratch = tempfile::tempdir().expect("scratch");
    let r = build(&cfg, scratch.path()).expect("router builds");
    r.init(FsOptions::ASYNC_READ | FsOptions::DO_READDIRPLUS)
        .expect("init");
    (r, scratch)
}

fn host_ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).expect("lstat").ino()
}

/// `name -> (d_ino, st_ino of the entry, node id)` from READDIRPLUS, and `name -> d_ino`
/// from plain READDIR, of directory `ino` (with `.` and `..` where the provider lists them:
/// `memory` and `overlay` do, the host provider does not).
#[allow(clippy::type_complexity)]
fn listings(fs: &Fs, ino: u64) -> (HashMap<String, (u64, u64, u64)>, HashMap<String, u64>) {
    let mut plus = HashMap::new();
    let (h, _) = fs.opendir(&root(), ino, 0).expect("opendir");
    fs.readdirplus(&root(), ino, h.unwrap_or(0), 65536, 0, &mut |d, e| {
        let name = String::from_utf8_lossy(d.name).into_owned();
        plus.insert(name, (d.ino, e.attr.st_ino, e.inode));
        Ok(1)
    })
    .expect("readdirplus");
    let mut plain = HashMap::new();
    let (h, _) = fs.opendir(&root(), ino, 0).expect("opendir");
    fs.readdir(&root(), ino, h.unwrap_or(0), 65536, 0, &mut |d| {
        plain.insert(String::from_utf8_lossy(d.name).into_owned(), d.ino);
        Ok(1)
    })
    .expect("readdir");
    (plus, plain)
}

/// A host_fs workspace shows the host's numbers in LOOKUP, GETATTR, READDIRPLUS and READDIR;
/// node ids stay the tree's; hard links share the number, a rename and a forget keep it.
#[test]
fn host_fs_shows_host_inode_numbers_that_survive_rename_links_and_forget() {
    let host = tempfile::tempdir().expect("host");
    let h = host.path();
    std::fs::create_dir(h.join("dir")).expect("seed");
    std::fs::write(h.join("dir/file"), b"x").expect("seed");
    std::fs::hard_link(h.join("dir/file"), h.join("link")).expect("seed");
    let (r, _s) = router(&[("/ws", mount("host_fs", h))]);
    let fs: &Fs = &r;

    assert_eq!(getattr(fs, ROOT).st_ino, host_ino(h), "the workspace root");
    let dir = lookup(fs, ROOT, "dir").expect("dir");
    assert_eq!(dir.attr.st_ino, host_ino(&h.join("dir")));
    assert_ne!(dir.inode, dir.attr.st_ino, "node ids stay the tree's");
    let file = lookup(fs, dir.inode, "file").expect("file");
    let want = host_ino(&h.join("dir/file"));
    assert_eq!(file.attr.st_ino, want);
    assert_eq!(getattr(fs, file.inode).st_ino, want);
    let link = lookup(fs, ROOT, "link").expect("link");
    assert_eq!(link.attr.st_ino, want, "a hard link shares the number");
    assert_eq!(link.attr.st_nlink, 2);

    let (plus, plain) = listings(fs, dir.inode);
    assert_eq!(plus["file"].0, want, "READDIRPLUS d_ino");
    assert_eq!(plus["file"].1, want, "READDIRPLUS st_ino");
    assert_eq!(plain["file"], want, "READDIR d_ino");
    let (plus, plain) = listings(fs, ROOT);
    assert_eq!(plus["dir"].1, host_ino(&h.join("dir")));
    assert_eq!(plain["dir"], host_ino(&h.join("dir")));
    assert_eq!(plain["link"], want);

    rename(fs, dir.inode, "file", ROOT, "moved", 0).expect("rename");
    let moved = lookup(fs, ROOT, "moved").expect("moved");
    assert_eq!(moved.attr.st_ino, want, "a rename keeps the number");
    fs.forget(&root(), moved.inode, 1);
    fs.forget(&root(), file.inode, 1);
    fs.forget(&root(), link.inode, 1);
    let again = lookup(fs, ROOT, "moved").expect("again");
    assert_eq!(again.attr.st_ino, want, "forget and lookup again keep it");
    let made = mkdir(fs, ROOT, "new").expect("mkdir");
    assert_eq!(made.attr.st_ino, host_ino(&h.join("new")), "a new entry");
}

/// Every number the tree shows in `dir` (recursively, READDIRPLUS and GETATTR): `name ->
/// st_ino`, with the names' paths.
fn walk(fs: &Fs, dir: u64, path: &str, out: &mut Vec<(String, u64)>) {
    let (plus, plain) = listings(fs, dir);
    for (name, (d_ino, st_ino, node)) in plus {
        if name == "." || name == ".." {
            continue;
        }
        assert_eq!(d_ino, st_ino, "{path}/{name}: d_ino and st_ino agree");
        assert_eq!(
            plain[&name], d_ino,
            "{path}/{name}: READDIR and READDIRPLUS agree"
        );
        assert_eq!(
            getattr(fs, node).st_ino,
            st_ino,
            "{path}/{name}: GETATTR agrees"
        );
        let p = format!("{path}/{name}");
        out.push((p.clone(), st_ino));
        if getattr(fs, node).st_mode & libc::S_IFMT == libc::S_IFDIR {
            walk(fs, node, &p, out);
        }
    }
}

/// The risky case on purpose: a host_fs workspace on one device (its numbers shown as the
/// host's), a memory mount, an overlay and synthesised directories inside it, and a host_fs
/// mount of a directory on another device (tmpfs `/dev/shm`, whose small numbers are
/// likely to equal some on the workspace's device). Nothing the tree shows collides, apart
/// from the host's own hard links.
#[test]
fn numbers_from_other_providers_and_devices_never_collide_with_host_numbers() {
    let host = tempfile::tempdir().expect("host");
    let h = host.path();
    for i in 0..50 {
        std::fs::write(h.join(format!("f{i}")), b"x").expect("seed");
    }
    std::fs::create_dir(h.join("lower")).expect("seed");
    std::fs::write(h.join("lower/l"), b"l").expect("seed");
    let other = tempfile::tempdir_in("/dev/shm").expect("a tmpfs directory");
    std::fs::write(other.path().join("t"), b"t").expect("seed");
    assert_ne!(
        std::fs::metadata(other.path()).expect("stat").dev(),
        std::fs::metadata(h).expect("stat").dev(),
        "the test needs two devices"
    );
    let (r, _s) = router(&[
        ("/ws", mount("host_fs", h)),
        ("/ws/mem", mount("memory", h)),
        ("/ws/syn/ov", mount("overlay", &h.join("lower"))),
        ("/ws/syn/shm", mount("host_fs", other.path())),
    ]);
    let fs: &Fs = &r;
    let mem = lookup(fs, ROOT, "mem").expect("mem");
    for i in 0..20 {
        mkdir(fs, mem.inode, &format!("d{i}")).expect("memory mkdir");
    }
    let mut all = Vec::new();
    walk(fs, ROOT, "", &mut all);
    let shown: HashMap<&str, u64> = all.iter().map(|(p, i)| (p.as_str(), *i)).collect();
    assert_eq!(shown["/f0"], host_ino(&h.join("f0")));
    for p in [
        "/mem",
        "/mem/d0",
        "/syn",
        "/syn/ov",
        "/syn/ov/l",
        "/syn/shm",
        "/syn/shm/t",
    ] {
        assert!(
            shown[p] >= HOST_INO_LIMIT,
            "{p}: {:#x} is an own number",
            shown[p]
        );
    }
    let mut seen = HashSet::new();
    for (p, ino) in &all {
        assert!(seen.insert(*ino), "{p}: {ino:#x} shown twice");
    }
    assert_eq!(getattr(fs, ROOT).st_ino, host_ino(h));
    assert!(
        !seen.contains(&host_ino(h)),
        "the root's number is its own too"
    );
}

/// Without a host_fs mount at the workspace, the first host_fs mount's device is the one
/// shown; the synthesised root shows an own number.
#[test]
fn the_first_host_mount_picks_the_device_when_the_workspace_is_not_one() {
    let host = tempfile::tempdir().expect("host");
    std::fs::write(host.path().join("f"), b"x").expect("seed");
    let (r, _s) = router(&[
        ("/ws/a", mount("host_fs", host.path())),
        ("/ws/m", mount("memory", host.path())),
    ]);
    let fs: &Fs = &r;
    assert!(
        getattr(fs, ROOT).st_ino >= HOST_INO_LIMIT,
        "synthesised root"
    );
    let a = lookup(fs, ROOT, "a").expect("a");
    assert_eq!(a.attr.st_ino, host_ino(host.path()));
    let f = lookup(fs, a.inode, "f").expect("f");
    assert_eq!(f.attr.st_ino, host_ino(&host.path().join("f")));
    let m = lookup(fs, ROOT, "m").expect("m");
    assert!(m.attr.st_ino >= HOST_INO_LIMIT);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

/// A plain READDIR of a host directory (served from the provider's READDIRPLUS) leaves no
/// reference behind: the provider's descriptor count is back where it was.
#[test]
fn plain_readdir_of_a_host_directory_keeps_no_references() {
    let host = tempfile::tempdir().expect("host");
    for i in 0..200 {
        std::fs::write(host.path().join(format!("f{i}")), b"x").expect("seed");
    }
    let (r, _s) = router(&[("/ws", mount("host_fs", host.path()))]);
    let fs: &Fs = &r;
    let (h, _) = fs.opendir(&root(), ROOT, 0).expect("opendir");
    let h = h.unwrap_or(0);
    let before = open_fds();
    let mut n = 0;
    // A small buffer: entries that do not fit are dropped by the provider itself.
    let mut offset = 0;
    loop {
        let mut got = 0;
        fs.readdir(&root(), ROOT, h, 4096, offset, &mut |d| {
            if got == 7 {
                return Ok(0);
            }
            got += 1;
            offset = d.offset;
            Ok(1)
        })
        .expect("readdir");
        if got == 0 {
            break;
        }
        n += got;
    }
    assert!(n >= 200, "{n} entries");
    assert_eq!(open_fds(), before, "descriptors held after READDIR");
    fs.releasedir(&root(), ROOT, 0, h).expect("releasedir");
}
