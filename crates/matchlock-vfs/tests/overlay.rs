//! Component tests of the overlay provider through the `FileSystem` trait, on real host
//! directories: the lower tree must come out byte for byte unchanged.

mod provider_harness;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use fuse_backend_rs::api::filesystem::FileSystem;
use matchlock_vfs::overlay::{OverlayError, OverlayFs};
use provider_harness::*;

const RW: u32 = libc::O_RDWR as u32;

/// Everything observable about a host tree: type, bytes or target, mode, mtime.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir).expect("read lower dir") {
            let path = ent.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let body = if meta.is_dir() {
                stack.push(path.clone());
                Vec::new()
            } else if meta.file_type().is_symlink() {
                fs::read_link(&path)
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_file() {
                fs::read(&path).expect("read lower file")
            } else {
                Vec::new()
            };
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            out.insert(rel, (meta.mode(), body, meta.mtime(), meta.mtime_nsec()));
        }
    }
    out
}

struct Setup {
    _tmp: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    outside: PathBuf,
    fs: OverlayFs,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(lower.join("dir/sub")).expect("mkdir");
    fs::create_dir(&upper).expect("mkdir upper");
    fs::create_dir(&outside).expect("mkdir outside");
    fs::write(outside.join("secret"), b"host secret").expect("write");
    fs::write(lower.join("a.txt"), b"lower content").expect("write");
    fs::write(lower.join("dir/sub/b.txt"), b"bee").expect("write");
    fs::write(lower.join("dir/c.txt"), b"sea").expect("write");
    symlink(&outside, lower.join("link_out")).expect("symlink");
    symlink("../../outside/secret", lower.join("dir/rel_out")).expect("symlink");
    let fs = OverlayFs::new(&lower, &upper).expect("overlay");
    Setup {
        _tmp: tmp,
        lower,
        upper,
        outside,
        fs,
    }
}

fn walk(fs: &Fs, path: &str) -> u64 {
    path.split('/')
        .filter(|p| !p.is_empty())
        .fold(ROOT, |ino, name| {
            lookup(fs, ino, name)
                .unwrap_or_else(|e| panic!("lookup {name} in {path}: {e}"))
                .inode
        })
}

fn upper_files(s: &Setup) -> usize {
    fs::read_dir(&s.upper).expect("read upper").count()
}

#[test]
fn lower_files_are_readable_and_readdir_shows_the_tree() {
    let s = setup();
    let a = walk(&s.fs, "a.txt");
    assert_eq!(contents(&s.fs, a), b"lower content");
    let st = getattr(&s.fs, a);
    let host = fs::metadata(s.lower.join("a.txt")).expect("stat");
    assert_eq!(st.st_size as u64, host.len());
    assert_eq!(st.st_mode, host.mode());
    assert_eq!((st.st_mtime, st.st_uid), (host.mtime(), host.uid()));
    assert_eq!(names(&s.fs, ROOT), ["a.txt", "dir", "link_out"]);
    assert_eq!(contents(&s.fs, walk(&s.fs, "dir/sub/b.txt")), b"bee");
    assert_eq!(getattr(&s.fs, walk(&s.fs, "dir")).st_nlink, 3);
    assert_eq!(upper_files(&s), 0, "nothing copied at start or on read");
}

#[test]
fn writing_a_lower_file_copies_it_up_and_leaves_the_lower_file_alone() {
    let s = setup();
    let before = snapshot(&s.lower);
    let a = walk(&s.fs, "a.txt");
    let fh = open(&s.fs, a, RW).expect("open rw");
    write(&s.fs, a, fh, 0, b"LOWER").expect("write");
    release(&s.fs, a, fh);
    assert_eq!(contents(&s.fs, a), b"LOWER content");
    assert_eq!(upper_files(&s), 1);
    let b = walk(&s.fs, "dir/sub/b.txt");
    let fh = open(&s.fs, b, (libc::O_WRONLY | libc::O_TRUNC) as u32).expect("open trunc");
    write(&s.fs, b, fh, 0, b"x").expect("write");
    release(&s.fs, b, fh);
    assert_eq!(contents(&s.fs, b), b"x");
    let c = walk(&s.fs, "dir/c.txt");
    set_size(&s.fs, c, 1).expect("truncate");
    assert_eq!(contents(&s.fs, c), b"s");
    let mut attr = getattr(&s.fs, c);
    attr.st_mode = 0o600;
    let valid = fuse_backend_rs::api::filesystem::SetattrValid::MODE;
    s.fs.setattr(&root(), c, attr, None, valid).expect("chmod");
    assert_eq!(
        snapshot(&s.lower),
        before,
        "lower tree unchanged byte for byte"
    );
    // The upper copies are private to the owner.
    for ent in fs::read_dir(&s.upper).expect("read upper") {
        let meta = ent.expect("entry").metadata().expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
    }
}

#[test]
fn create_unlink_and_rename_of_lower_entries_never_touch_the_lower_tree() {
    let s = setup();
    let before = snapshot(&s.lower);
    s.fs.unlink(&root(), ROOT, &c("a.txt"))
        .expect("unlink lower file");
    assert_eq!(errno(lookup(&s.fs, ROOT, "a.txt")), libc::ENOENT);
    assert_eq!(names(&s.fs, ROOT), ["dir", "link_out"]);
    // A new file in a lower directory is listed with the lower entries.
    let sub = walk(&s.fs, "dir/sub");
    let (n, fh) = create(&s.fs, sub, "new.txt", 0o644, RW).expect("create");
    write(&s.fs, n.inode, fh, 0, b"fresh").expect("write");
    release(&s.fs, n.inode, fh);
    assert_eq!(names(&s.fs, sub), ["b.txt", "new.txt"]);
    // Renaming a lower directory moves its lower and new children.
    rename(&s.fs, ROOT, "dir", ROOT, "moved", 0).expect("rename dir");
    assert_eq!(errno(lookup(&s.fs, ROOT, "dir")), libc::ENOENT);
    assert_eq!(contents(&s.fs, walk(&s.fs, "moved/sub/b.txt")), b"bee");
    assert_eq!(contents(&s.fs, walk(&s.fs, "moved/sub/new.txt")), b"fresh");
    // Atomic replace of a lower file by rename.
    let moved = walk(&s.fs, "moved");
    let (t, fh) = create(&s.fs, moved, "c.txt.tmp", 0o644, RW).expect("create tmp");
    write(&s.fs, t.inode, fh, 0, b"replaced").expect("write");
    release(&s.fs, t.inode, fh);
    rename(&s.fs, moved, "c.txt.tmp", moved, "c.txt", 0).expect("rename over");
    assert_eq!(contents(&s.fs, walk(&s.fs, "moved/c.txt")), b"replaced");
    // A lower directory with lower children is not empty; emptied, it can go.
    let msub = walk(&s.fs, "moved/sub");
    assert_eq!(
        errno(s.fs.rmdir(&root(), moved, &c("sub"))),
        libc::ENOTEMPTY
    );
    s.fs.unlink(&root(), msub, &c("b.txt")).expect("unlink");
    s.fs.unlink(&root(), msub, &c("new.txt")).expect("unlink");
    s.fs.rmdir(&root(), moved, &c("sub")).expect("rmdir");
    assert_eq!(names(&s.fs, moved), ["c.txt", "rel_out"]);
    assert_eq!(snapshot(&s.lower), before, "lower tree unchanged");
}

#[test]
fn symlinks_out_of_the_lower_tree_are_never_followed_on_the_host() {
    let s = setup();
    let out = lookup(&s.fs, ROOT, "link_out").expect("lookup link");
    assert_eq!(out.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    let target = s.fs.readlink(&root(), out.inode).expect("readlink");
    assert_eq!(target, s.outside.as_os_str().as_encoded_bytes());
    assert_eq!(errno(lookup(&s.fs, out.inode, "secret")), libc::ENOTDIR);
    assert_eq!(
        errno(open(&s.fs, out.inode, libc::O_RDONLY as u32)),
        libc::ELOOP
    );
    let rel = walk(&s.fs, "dir/rel_out");
    assert_eq!(
        s.fs.readlink(&root(), rel).expect("readlink"),
        b"../../outside/secret"
    );
    assert_eq!(errno(open(&s.fs, rel, RW)), libc::ELOOP);
    // Replacing the symlink by a file writes nothing outside.
    s.fs.unlink(&root(), ROOT, &c("link_out")).expect("unlink");
    let (f, fh) = create(&s.fs, ROOT, "link_out", 0o644, RW).expect("create");
    write(&s.fs, f.inode, fh, 0, b"guest").expect("write");
    release(&s.fs, f.inode, fh);
    assert_eq!(
        fs::read(s.outside.join("secret")).expect("read"),
        b"host secret"
    );
    assert!(fs::symlink_metadata(s.lower.join("link_out"))
        .expect("lstat")
        .file_type()
        .is_symlink());
}

#[test]
fn hard_link_to_a_lower_file_shares_the_copy() {
    let s = setup();
    let a = walk(&s.fs, "a.txt");
    s.fs.link(&root(), a, ROOT, &c("alias")).expect("link");
    let fh = open(&s.fs, a, RW).expect("open");
    write(&s.fs, a, fh, 0, b"X").expect("write");
    release(&s.fs, a, fh);
    assert_eq!(contents(&s.fs, walk(&s.fs, "alias")), b"Xower content");
    assert_eq!(getattr(&s.fs, a).st_nlink, 2);
    assert_eq!(
        fs::read(s.lower.join("a.txt")).expect("read"),
        b"lower content"
    );
}

#[test]
fn upper_copies_are_deleted_when_the_inode_is_freed() {
    let s = setup();
    let (f, fh) = create(&s.fs, ROOT, "scratch", 0o644, RW).expect("create");
    write(&s.fs, f.inode, fh, 0, b"tmp").expect("write");
    release(&s.fs, f.inode, fh);
    assert_eq!(upper_files(&s), 1);
    s.fs.unlink(&root(), ROOT, &c("scratch")).expect("unlink");
    assert_eq!(upper_files(&s), 1, "the kernel still holds the inode");
    s.fs.forget(&root(), f.inode, 1);
    assert_eq!(upper_files(&s), 0);
}

#[test]
fn lower_special_files_are_not_shown() {
    let s = setup();
    let status = std::process::Command::new("mkfifo")
        .arg(s.lower.join("dir/fifo"))
        .status()
        .expect("run mkfifo");
    assert!(status.success());
    assert_eq!(
        names(&s.fs, walk(&s.fs, "dir")),
        ["c.txt", "rel_out", "sub"]
    );
}

#[test]
fn setup_errors_are_clear() {
    let s = setup();
    let Err(err) = OverlayFs::new(&s.lower.join("a.txt"), &s.upper) else {
        panic!("a single file is refused");
    };
    assert!(
        matches!(err, OverlayError::LowerNotDirectory { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not a directory"), "{err}");
    let Err(err) = OverlayFs::new(&s.lower.join("missing"), &s.upper) else {
        panic!("a missing lower is refused");
    };
    assert!(matches!(err, OverlayError::LowerResolve { .. }), "{err}");
    fs::write(s.upper.join("junk"), b"x").expect("write");
    let Err(err) = OverlayFs::new(&s.lower, &s.upper) else {
        panic!("a non-empty upper is refused");
    };
    assert!(matches!(err, OverlayError::UpperNotEmpty { .. }), "{err}");
}

/// Both providers mount in the library's `Vfs` router (what the transport serves) and answer
/// through it: mount root entry, inode translation, create and read back.
#[test]
fn providers_mount_in_the_library_vfs_router() {
    use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions};
    use fuse_backend_rs::api::{Vfs, VfsOptions};
    use matchlock_vfs::memory::MemFs;

    let s = setup();
    let vfs = Vfs::new(VfsOptions::default());
    vfs.init(FsOptions::ASYNC_READ | FsOptions::DO_READDIRPLUS)
        .expect("vfs init");
    vfs.mount(Box::new(MemFs::new(1 << 20)), "/mem")
        .expect("mount memory");
    let Setup { fs: overlay, .. } = s;
    vfs.mount(Box::new(overlay), "/ws").expect("mount overlay");

    let cx = root();
    let mem = vfs
        .lookup(&cx, ROOT.into(), &c("mem"))
        .expect("lookup /mem");
    let args = CreateIn {
        flags: RW,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, fh, _, _) = vfs
        .create(&cx, mem.inode.into(), &c("f"), args)
        .expect("create through vfs");
    let fh = fh.expect("handle");
    let mut r = provider_harness::Payload::from(b"via router".to_vec());
    vfs.write(&cx, e.inode.into(), fh, &mut r, 10, 0, None, false, 0, 0)
        .expect("write through vfs");
    let mut w = provider_harness::Reply(Vec::new());
    vfs.read(&cx, e.inode.into(), fh, &mut w, 100, 0, None, 0)
        .expect("read through vfs");
    assert_eq!(w.0, b"via router");

    let ws = vfs.lookup(&cx, ROOT.into(), &c("ws")).expect("lookup /ws");
    let a = vfs
        .lookup(&cx, ws.inode.into(), &c("a.txt"))
        .expect("lookup lower file through vfs");
    assert_ne!(a.inode >> 56, 0, "inode carries the mount index");
    let (fh, _, _) = vfs
        .open(&cx, a.inode.into(), libc::O_RDONLY as u32, 0)
        .expect("open");
    let mut w = provider_harness::Reply(Vec::new());
    vfs.read(
        &cx,
        a.inode.into(),
        fh.expect("handle"),
        &mut w,
        100,
        0,
        None,
        0,
    )
    .expect("read lower file through vfs");
    assert_eq!(w.0, b"lower content");
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Host descriptors follow the guest's open files, not the files it has touched: reading 1,000
/// lower files and creating 1,000 files (each opened and released) leaves no descriptors behind.
#[test]
fn host_descriptors_are_closed_when_the_guest_closes_files() {
    let s = setup();
    let many = s.lower.join("many");
    fs::create_dir(&many).expect("mkdir");
    for i in 0..1000 {
        fs::write(many.join(format!("f{i}")), format!("file {i}")).expect("write");
    }
    let before = open_fds();
    let dir = walk(&s.fs, "many");
    for i in 0..1000 {
        let ino = lookup(&s.fs, dir, &format!("f{i}")).expect("lookup").inode;
        assert_eq!(contents(&s.fs, ino), format!("file {i}").as_bytes());
        let (e, fh) = create(&s.fs, dir, &format!("new{i}"), 0o644, RW).expect("create");
        write(&s.fs, e.inode, fh, 0, b"x").expect("write");
        release(&s.fs, e.inode, fh);
    }
    // Truncating a closed file opens and closes its copy.
    let f0 = walk(&s.fs, "many/f0");
    set_size(&s.fs, f0, 2).expect("truncate");
    assert_eq!(contents(&s.fs, f0), b"fi");
    let after = open_fds();
    // Other tests run in parallel threads and hold a few descriptors of their own.
    assert!(
        after < before + 100,
        "{before} descriptors before, {after} after"
    );
    assert_eq!(upper_files(&s), 1001);
}

#[test]
fn upper_must_be_a_directory() {
    let s = setup();
    let file = s.upper.with_file_name("upper-file");
    fs::write(&file, b"x").expect("write");
    let Err(err) = OverlayFs::new(&s.lower, &file) else {
        panic!("a file as upper is refused");
    };
    assert!(
        matches!(err, OverlayError::UpperNotDirectory { .. }),
        "{err}"
    );
}

#[test]
fn creating_in_a_removed_directory_fails_and_leaves_no_upper_file() {
    let s = setup();
    let gone = mkdir(&s.fs, ROOT, "gone").expect("mkdir");
    s.fs.rmdir(&root(), ROOT, &c("gone")).expect("rmdir");
    assert_eq!(
        errno(create(&s.fs, gone.inode, "f", 0o644, RW)),
        libc::ENOENT
    );
    assert_eq!(upper_files(&s), 0);
}

/// Threads writing one lower file at once: exactly one copy-up, no write lost.
#[test]
fn concurrent_first_writes_copy_up_once() {
    let s = setup();
    let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    fs::write(s.lower.join("big"), &big).expect("write");
    let before = snapshot(&s.lower);
    let fs = std::sync::Arc::new(s.fs);
    let ino = walk(&*fs, "big");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let fs = std::sync::Arc::clone(&fs);
            std::thread::spawn(move || {
                let fh = open(&*fs, ino, RW).expect("open");
                for i in 0..16u64 {
                    let off = (i * 8 + t) * 512;
                    write(&*fs, ino, fh, off, &[t as u8 + 1; 512]).expect("write");
                }
                release(&*fs, ino, fh);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let data = contents(&*fs, ino);
    assert_eq!(data.len(), big.len());
    for (i, block) in data.chunks(512).enumerate() {
        assert!(
            block.iter().all(|b| usize::from(*b) == i % 8 + 1),
            "block {i}"
        );
    }
    assert_eq!(fs::read_dir(&s.upper).expect("read upper").count(), 1);
    assert_eq!(snapshot(&s.lower), before);
}

/// Bytes of the regular files in `dir` (the overlay's flat upper directory).
fn upper_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .expect("upper listing")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum()
}

/// The upper directory is bounded: copy-ups, new files and growth past the quota are
/// `ENOSPC` before anything reaches the host; unlinking and shrinking give bytes back.
#[test]
fn upper_directory_is_bounded_by_the_quota() {
    const QUOTA: u64 = 1 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (lower, upper) = (tmp.path().join("lower"), tmp.path().join("upper"));
    fs::create_dir_all(&lower).expect("mkdir");
    fs::create_dir(&upper).expect("mkdir");
    fs::write(lower.join("big"), vec![7u8; 600 << 10]).expect("seed");
    fs::write(lower.join("small"), b"small").expect("seed");
    let ov = OverlayFs::with_quota(&lower, &upper, QUOTA).expect("overlay");
    let fs: &Fs = &ov;

    let st = fs.statfs(&root(), ROOT).expect("statfs");
    assert_eq!(st.f_blocks * st.f_bsize, QUOTA, "statfs reports the quota");

    // A one-byte write copies 600 KiB up: charged.
    let big = lookup(fs, ROOT, "big").expect("big");
    let fh = open(fs, big.inode, RW).expect("open");
    write(fs, big.inode, fh, 0, b"x").expect("copy-up within the quota");
    release(fs, big.inode, fh);
    assert_eq!(upper_bytes(&upper), 600 << 10);

    let (new, fh) = create(fs, ROOT, "new", 0o644, RW).expect("create");
    write(fs, new.inode, fh, 0, &vec![1u8; 300 << 10]).expect("300 KiB fits");
    let over = write(fs, new.inode, fh, 300 << 10, &vec![1u8; 200 << 10]);
    assert_eq!(errno(over), libc::ENOSPC);
    assert!(upper_bytes(&upper) <= QUOTA, "{}", upper_bytes(&upper));
    // A hole counts too: the charge is by size.
    assert_eq!(errno(set_size(fs, new.inode, 64 << 20)), libc::ENOSPC);
    // Copying up another lower file past the quota is refused before the copy.
    let small = lookup(fs, ROOT, "small").expect("small");
    assert_eq!(errno(set_size(fs, small.inode, 200 << 10)), libc::ENOSPC);
    assert_eq!(fs::read(lower.join("small")).expect("lower"), b"small");
    release(fs, new.inode, fh);

    // Shrinking gives bytes back.
    set_size(fs, new.inode, 0).expect("truncate");
    let fh = open(fs, new.inode, RW).expect("open");
    write(fs, new.inode, fh, 0, &vec![1u8; 300 << 10]).expect("fits again after truncate");
    release(fs, new.inode, fh);
    // So does unlinking (once the kernel forgets the inode).
    fs.unlink(&root(), ROOT, &c("new")).expect("unlink");
    fs.forget(&root(), new.inode, 1);
    let (again, fh) = create(fs, ROOT, "again", 0o644, RW).expect("create");
    write(fs, again.inode, fh, 0, &vec![1u8; 350 << 10]).expect("fits after unlink");
    release(fs, again.inode, fh);
    assert!(upper_bytes(&upper) <= QUOTA, "{}", upper_bytes(&upper));
}
