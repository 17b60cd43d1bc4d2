//! Plain READDIR of a `host_fs` directory through the real router (`matchlock_vfs::build`):
//! served from `getdents64` without looking entries up (see `matchlock_vfs::hostdir`), with
//! `d_ino` equal to what `stat` shows for every entry, mount points included, and offsets
//! that resume a listing across chunks while the directory changes.
//!
//! The mount-point test needs root (it mounts a tmpfs and a bind mount under a temporary
//! directory and unmounts them on drop), as the suite's CI runs.

mod provider_harness;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::FileSystem;
use matchlock_api::{MountConfig, VfsConfig};
use matchlock_vfs::nested::HOST_INO_LIMIT;
use matchlock_vfs::router::{build, Router};
use provider_harness::{lookup, root, Fs, ROOT};

fn router(host: &Path) -> (Router, tempfile::TempDir) {
    let mut cfg = VfsConfig {
        workspace: "/ws".into(),
        ..VfsConfig::default()
    };
    cfg.mounts.insert(
        "/ws".into(),
        MountConfig {
            kind: "host_fs".into(),
            host_path: host.to_string_lossy().into_owned(),
            ..MountConfig::default()
        },
    );
    let scratch = tempfile::tempdir().expect("scratch");
    let r = build(&cfg, scratch.path()).expect("router builds");
    r.init(FsOptions::ASYNC_READ | FsOptions::DO_READDIRPLUS)
        .expect("init");
    (r, scratch)
}

/// The provider's own part of a node id (the tree keeps the mount in the top bits).
fn provider_id(node: u64) -> u64 {
    node & (HOST_INO_LIMIT - 1)
}

/// Plain READDIR of `dir` in chunks of at most `per_chunk` entries, calling `between`
/// after every chunk; `name -> d_ino`, failing on a name listed twice.
fn list_chunked(
    fs: &Fs,
    dir: u64,
    per_chunk: usize,
    between: &mut dyn FnMut(usize),
) -> HashMap<String, u64> {
    let (h, _) = fs.opendir(&root(), dir, 0).expect("opendir");
    let h = h.unwrap_or(0);
    let mut out = HashMap::new();
    let mut offset = 0;
    for chunk in 0.. {
        let mut got = 0;
        fs.readdir(&root(), dir, h, 4096, offset, &mut |d| {
            if got == per_chunk {
                return Ok(0);
            }
            got += 1;
            offset = d.offset;
            let name = String::from_utf8_lossy(d.name).into_owned();
            assert!(out.insert(name.clone(), d.ino).is_none(), "{name} twice");
            Ok(1)
        })
        .expect("readdir");
        if got == 0 {
            break;
        }
        between(chunk);
    }
    fs.releasedir(&root(), dir, 0, h).expect("releasedir");
    out
}

/// A READDIR creates no provider inode: the provider numbers each inode it meets the first
/// time from one counter, so a LOOKUP of a new name right after the listing gets the next
/// number only if the listing looked nothing up (the library's READDIR and READDIRPLUS
/// look every entry up). Entries created and removed between chunks neither repeat nor
/// hide the others.
#[test]
fn plain_readdir_of_a_host_directory_looks_no_entry_up() {
    let host = tempfile::tempdir().expect("host");
    let h = host.path();
    std::fs::create_dir(h.join("d")).expect("seed");
    for i in 0..300 {
        std::fs::write(h.join(format!("d/f{i:03}")), b"x").expect("seed");
    }
    std::fs::write(h.join("before"), b"x").expect("seed");
    std::fs::write(h.join("after"), b"x").expect("seed");
    let (r, _s) = router(h);
    let fs: &Fs = &r;
    let dir = lookup(fs, ROOT, "d").expect("d");
    let before = lookup(fs, ROOT, "before").expect("before");
    let mut churn = |chunk: usize| {
        std::fs::write(h.join(format!("d/new{chunk}")), b"n").expect("churn");
        let _ = std::fs::remove_file(h.join(format!("d/new{}", chunk.wrapping_sub(1))));
    };
    let listed = list_chunked(fs, dir.inode, 7, &mut churn);
    let after = lookup(fs, ROOT, "after").expect("after");
    assert_eq!(
        provider_id(after.inode),
        provider_id(before.inode) + 1,
        "the READDIR created provider inodes (looked entries up)"
    );
    for i in 0..300 {
        let name = format!("f{i:03}");
        let want = std::fs::metadata(h.join("d").join(&name))
            .expect("stat")
            .ino();
        assert_eq!(listed.get(&name), Some(&want), "{name}: d_ino is st_ino");
    }
    assert!(!listed.contains_key(".") && !listed.contains_key(".."));
}

/// A mount at a fresh directory, unmounted (lazily) when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(args: &[&str], target: &Path) -> Mounted {
        std::fs::create_dir_all(target).expect("mount point");
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .expect("mount (the test needs root)");
        assert!(out.status.success(), "mount {args:?}: {out:?}");
        Mounted(target.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// `d_ino` of a mount point is what `stat` shows: the mounted root's, not the covered
/// directory's that `getdents64` gives: an own number for a tmpfs (another device), the
/// bound directory's host number for a bind mount of the same device.
#[test]
fn a_mount_point_in_a_listed_directory_shows_what_stat_shows() {
    let host = tempfile::tempdir().expect("host");
    let h = host.path();
    std::fs::create_dir_all(h.join("d")).expect("seed");
    std::fs::create_dir_all(h.join("elsewhere")).expect("seed");
    std::fs::write(h.join("elsewhere/e"), b"e").expect("seed");
    std::fs::write(h.join("d/plain"), b"p").expect("seed");
    std::fs::create_dir(h.join("d/tmp")).expect("seed");
    let covered = std::fs::metadata(h.join("d/tmp")).expect("stat").ino();
    let _tmp = Mounted::new(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &h.join("d/tmp"));
    let elsewhere = h.join("elsewhere");
    let _bind = Mounted::new(
        &["--bind", elsewhere.to_str().expect("utf-8")],
        &h.join("d/bind"),
    );
    let bound = std::fs::metadata(&elsewhere).expect("stat").ino();
    let (r, _s) = router(h);
    let fs: &Fs = &r;
    let dir = lookup(fs, ROOT, "d").expect("d");
    let listed = list_chunked(fs, dir.inode, usize::MAX, &mut |_| {});
    let names: HashSet<&str> = listed.keys().map(String::as_str).collect();
    assert_eq!(names, HashSet::from(["plain", "tmp", "bind"]));
    let tmp = lookup(fs, dir.inode, "tmp").expect("tmp");
    assert!(tmp.attr.st_ino >= HOST_INO_LIMIT, "tmpfs: an own number");
    assert_ne!(listed["tmp"], covered, "not the covered directory's number");
    assert_eq!(listed["tmp"], tmp.attr.st_ino, "tmp: d_ino is st_ino");
    let bind = lookup(fs, dir.inode, "bind").expect("bind");
    assert_eq!(
        bind.attr.st_ino, bound,
        "a bind mount shows the bound inode"
    );
    assert_eq!(listed["bind"], bound, "bind: d_ino is st_ino");
    assert_eq!(
        listed["plain"],
        std::fs::metadata(h.join("d/plain")).expect("stat").ino()
    );
}
