//! Component tests of the memory provider through the `FileSystem` trait.

mod provider_harness;

use std::sync::Arc;

use fuse_backend_rs::api::filesystem::{FileSystem, SetattrValid};
use matchlock_vfs::memory::MemFs;
use provider_harness::*;

const GIB: u64 = 1024 * 1024 * 1024;
const RW: u32 = libc::O_RDWR as u32;
const RO: u32 = libc::O_RDONLY as u32;
const WO: u32 = libc::O_WRONLY as u32;

fn fs() -> MemFs {
    MemFs::new(64 * 1024 * 1024)
}

#[test]
fn create_write_read_and_owner_from_context() {
    let fs = fs();
    let (e, fh) =
        create_as(&fs, &ctx(1000, 1001), ROOT, "a.txt", 0o644, RW).expect("operation succeeds");
    assert_eq!(
        write(&fs, e.inode, fh, 0, b"hello world").expect("operation succeeds"),
        11
    );
    assert_eq!(
        read(&fs, e.inode, fh, 6, 100).expect("operation succeeds"),
        b"world"
    );
    release(&fs, e.inode, fh);
    let st = getattr(&fs, e.inode);
    assert_eq!((st.st_uid, st.st_gid), (1000, 1001));
    assert_eq!(st.st_mode, libc::S_IFREG | 0o644, "umask 022 applied");
    assert_eq!(st.st_size, 11);
    assert_eq!(st.st_nlink, 1);
    assert_eq!(
        lookup(&fs, ROOT, "a.txt")
            .expect("operation succeeds")
            .inode,
        e.inode,
        "stable inode"
    );
    assert_eq!(errno(lookup(&fs, ROOT, "nope")), libc::ENOENT);
}

#[test]
fn o_excl_create_of_existing_name_is_eexist_and_plain_create_opens_it() {
    let fs = fs();
    let (e, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"keep me").expect("operation succeeds");
    release(&fs, e.inode, fh);
    let excl = (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u32;
    assert_eq!(errno(create(&fs, ROOT, "f", 0o644, excl)), libc::EEXIST);
    let (again, fh) = create(&fs, ROOT, "f", 0o600, RW).expect("operation succeeds");
    assert_eq!(again.inode, e.inode);
    assert_eq!(
        read(&fs, e.inode, fh, 0, 100).expect("operation succeeds"),
        b"keep me"
    );
    release(&fs, e.inode, fh);
    assert_eq!(
        getattr(&fs, e.inode).st_mode & 0o777,
        0o644,
        "mode unchanged"
    );
}

#[test]
fn o_trunc_on_open_and_create_truncates() {
    let fs = fs();
    let (e, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"a much longer original content").expect("operation succeeds");
    release(&fs, e.inode, fh);
    let fh =
        open(&fs, e.inode, (libc::O_WRONLY | libc::O_TRUNC) as u32).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"short").expect("operation succeeds");
    release(&fs, e.inode, fh);
    assert_eq!(
        contents(&fs, e.inode),
        b"short",
        "no stale tail (reference defect)"
    );
    let trunc = (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32;
    let (_, fh) = create(&fs, ROOT, "f", 0o644, trunc).expect("operation succeeds");
    release(&fs, e.inode, fh);
    assert_eq!(getattr(&fs, e.inode).st_size, 0);
    // O_TRUNC without write access does not truncate.
    let (e2, fh) = create(&fs, ROOT, "g", 0o644, RW).expect("operation succeeds");
    write(&fs, e2.inode, fh, 0, b"data").expect("operation succeeds");
    release(&fs, e2.inode, fh);
    let fh =
        open(&fs, e2.inode, (libc::O_RDONLY | libc::O_TRUNC) as u32).expect("operation succeeds");
    release(&fs, e2.inode, fh);
    assert_eq!(contents(&fs, e2.inode), b"data");
}

#[test]
fn o_append_writes_at_the_end_and_read_only_handles_cannot_write() {
    let fs = fs();
    let (e, fh) = create(&fs, ROOT, "log", 0o644, RW).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"one\n").expect("operation succeeds");
    release(&fs, e.inode, fh);
    let fh =
        open(&fs, e.inode, (libc::O_WRONLY | libc::O_APPEND) as u32).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"two\n").expect("operation succeeds");
    write(&fs, e.inode, fh, 1, b"three\n").expect("operation succeeds");
    assert_eq!(
        errno(read(&fs, e.inode, fh, 0, 10)),
        libc::EBADF,
        "write-only"
    );
    release(&fs, e.inode, fh);
    assert_eq!(contents(&fs, e.inode), b"one\ntwo\nthree\n");
    let fh = open(&fs, e.inode, RO).expect("operation succeeds");
    assert_eq!(errno(write(&fs, e.inode, fh, 0, b"x")), libc::EBADF);
    release(&fs, e.inode, fh);
}

#[test]
fn directory_rename_moves_the_subtree() {
    let fs = fs();
    let a = mkdir(&fs, ROOT, "a").expect("operation succeeds");
    let b = mkdir(&fs, a.inode, "b").expect("operation succeeds");
    let (f, fh) = create(&fs, b.inode, "f", 0o644, RW).expect("operation succeeds");
    write(&fs, f.inode, fh, 0, b"deep").expect("operation succeeds");
    release(&fs, f.inode, fh);
    let dst = mkdir(&fs, ROOT, "dst").expect("operation succeeds");
    rename(&fs, ROOT, "a", dst.inode, "c", 0).expect("operation succeeds");
    assert_eq!(errno(lookup(&fs, ROOT, "a")), libc::ENOENT);
    let c = lookup(&fs, dst.inode, "c").expect("operation succeeds");
    assert_eq!(c.inode, a.inode);
    let b2 = lookup(&fs, c.inode, "b").expect("operation succeeds");
    let f2 = lookup(&fs, b2.inode, "f").expect("operation succeeds");
    assert_eq!(f2.inode, f.inode);
    assert_eq!(contents(&fs, f2.inode), b"deep");
    assert_eq!(
        lookup(&fs, c.inode, "..")
            .expect("operation succeeds")
            .inode,
        dst.inode
    );
    // nlink: root has `dst` only (2 + 1), dst has `c` (2 + 1).
    assert_eq!(getattr(&fs, ROOT).st_nlink, 3);
    assert_eq!(getattr(&fs, dst.inode).st_nlink, 3);
    // Moving a directory into its own subtree is refused.
    assert_eq!(
        errno(rename(&fs, dst.inode, "c", b2.inode, "x", 0)),
        libc::EINVAL
    );
    assert_eq!(
        errno(rename(&fs, dst.inode, "c", c.inode, "x", 0)),
        libc::EINVAL
    );
}

#[test]
fn rename_over_existing_and_flags() {
    let fs = fs();
    let (old, fh) = create(&fs, ROOT, "target", 0o644, RW).expect("operation succeeds");
    write(&fs, old.inode, fh, 0, b"old").expect("operation succeeds");
    release(&fs, old.inode, fh);
    let (new, fh) = create(&fs, ROOT, "target.tmp", 0o644, RW).expect("operation succeeds");
    write(&fs, new.inode, fh, 0, b"new").expect("operation succeeds");
    release(&fs, new.inode, fh);
    let used_before = fs.used_bytes();
    rename(&fs, ROOT, "target.tmp", ROOT, "target", 0).expect("operation succeeds");
    assert_eq!(
        lookup(&fs, ROOT, "target")
            .expect("operation succeeds")
            .inode,
        new.inode
    );
    assert_eq!(errno(lookup(&fs, ROOT, "target.tmp")), libc::ENOENT);
    assert_eq!(contents(&fs, new.inode), b"new");
    assert_eq!(getattr(&fs, ROOT).st_nlink, 2);
    // The replaced inode lives until the kernel forgets it, then its quota comes back.
    fs.forget(&root(), old.inode, 1);
    assert!(fs.used_bytes() < used_before);

    let (x, fh) = create(&fs, ROOT, "x", 0o644, RW).expect("operation succeeds");
    release(&fs, x.inode, fh);
    let noreplace = libc::RENAME_NOREPLACE;
    assert_eq!(
        errno(rename(&fs, ROOT, "x", ROOT, "target", noreplace)),
        libc::EEXIST
    );
    rename(&fs, ROOT, "x", ROOT, "y", noreplace).expect("operation succeeds");
    rename(&fs, ROOT, "y", ROOT, "target", libc::RENAME_EXCHANGE).expect("operation succeeds");
    assert_eq!(
        lookup(&fs, ROOT, "target")
            .expect("operation succeeds")
            .inode,
        x.inode
    );
    assert_eq!(
        lookup(&fs, ROOT, "y").expect("operation succeeds").inode,
        new.inode
    );
    assert_eq!(
        errno(rename(
            &fs,
            ROOT,
            "y",
            ROOT,
            "absent",
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    assert_eq!(
        errno(rename(&fs, ROOT, "y", ROOT, "z", libc::RENAME_WHITEOUT)),
        libc::EINVAL
    );
    assert_eq!(
        errno(rename(
            &fs,
            ROOT,
            "y",
            ROOT,
            "z",
            noreplace | libc::RENAME_EXCHANGE
        )),
        libc::EINVAL
    );

    let d = mkdir(&fs, ROOT, "d").expect("operation succeeds");
    let full = mkdir(&fs, ROOT, "full").expect("operation succeeds");
    let (_, fh) = create(&fs, full.inode, "f", 0o644, RW).expect("operation succeeds");
    release(&fs, 0, fh);
    mkdir(&fs, ROOT, "empty").expect("operation succeeds");
    assert_eq!(
        errno(rename(&fs, ROOT, "d", ROOT, "full", 0)),
        libc::ENOTEMPTY
    );
    assert_eq!(errno(rename(&fs, ROOT, "d", ROOT, "y", 0)), libc::ENOTDIR);
    assert_eq!(errno(rename(&fs, ROOT, "y", ROOT, "d", 0)), libc::EISDIR);
    rename(&fs, ROOT, "d", ROOT, "empty", 0).expect("operation succeeds");
    assert_eq!(
        lookup(&fs, ROOT, "empty")
            .expect("operation succeeds")
            .inode,
        d.inode
    );
    assert_eq!(getattr(&fs, ROOT).st_nlink, 2 + 2, "d (as empty) and full");
    // Exchanging a directory and a file across directories fixes both parents' link counts.
    rename(&fs, ROOT, "empty", full.inode, "f", libc::RENAME_EXCHANGE).expect("operation succeeds");
    assert_eq!(getattr(&fs, ROOT).st_nlink, 3);
    assert_eq!(getattr(&fs, full.inode).st_nlink, 3);
    assert_eq!(
        lookup(&fs, d.inode, "..")
            .expect("operation succeeds")
            .inode,
        full.inode
    );
}

#[test]
fn hard_links_count_and_survive_unlink() {
    let fs = fs();
    let (f, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    write(&fs, f.inode, fh, 0, b"shared").expect("operation succeeds");
    release(&fs, f.inode, fh);
    let sub = mkdir(&fs, ROOT, "sub").expect("operation succeeds");
    let l = fs
        .link(&root(), f.inode, sub.inode, &c("g"))
        .expect("operation succeeds");
    assert_eq!(l.inode, f.inode);
    assert_eq!(l.attr.st_nlink, 2);
    assert_eq!(
        errno(fs.link(&root(), f.inode, sub.inode, &c("g"))),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs.link(&root(), sub.inode, ROOT, &c("dirlink"))),
        libc::EPERM
    );
    fs.unlink(&root(), ROOT, &c("f"))
        .expect("operation succeeds");
    assert_eq!(getattr(&fs, f.inode).st_nlink, 1);
    assert_eq!(contents(&fs, f.inode), b"shared");
    assert_eq!(errno(fs.unlink(&root(), ROOT, &c("sub"))), libc::EISDIR);
}

#[test]
fn symlinks_round_trip_and_are_bounded() {
    let fs = fs();
    let target = "../some/where/else";
    let s = fs
        .symlink(&root(), &c(target), ROOT, &c("ln"))
        .expect("operation succeeds");
    assert_eq!(s.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(s.attr.st_size as usize, target.len());
    assert_eq!(
        fs.readlink(&root(), s.inode).expect("operation succeeds"),
        target.as_bytes()
    );
    let long = "x".repeat(4097);
    assert_eq!(
        errno(fs.symlink(&root(), &c(&long), ROOT, &c("l2"))),
        libc::ENAMETOOLONG
    );
    let (f, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    release(&fs, f.inode, fh);
    assert_eq!(errno(fs.readlink(&root(), f.inode)), libc::EINVAL);
    let name = "n".repeat(256);
    assert_eq!(
        errno(create(&fs, ROOT, &name, 0o644, RW)),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(mkdir(&fs, ROOT, &name)), libc::ENAMETOOLONG);
}

#[test]
fn mknod_fifo_allowed_devices_refused() {
    let fs = fs();
    let e = fs
        .mknod(&root(), ROOT, &c("pipe"), libc::S_IFIFO | 0o644, 0, 0)
        .expect("operation succeeds");
    assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFIFO);
    let dev = fs.mknod(&root(), ROOT, &c("sda"), libc::S_IFBLK | 0o600, 0x0801, 0);
    assert_eq!(errno(dev), libc::EPERM);
    let chr = fs.mknod(&root(), ROOT, &c("null"), libc::S_IFCHR | 0o666, 0x0103, 0);
    assert_eq!(errno(chr), libc::EPERM);
    let reg = fs
        .mknod(&root(), ROOT, &c("plain"), libc::S_IFREG | 0o600, 0, 0)
        .expect("operation succeeds");
    assert_eq!(reg.attr.st_mode, libc::S_IFREG | 0o600);
}

#[test]
fn rmdir_semantics() {
    let fs = fs();
    let d = mkdir(&fs, ROOT, "d").expect("operation succeeds");
    assert_eq!(errno(mkdir(&fs, ROOT, "d")), libc::EEXIST);
    let (f, fh) = create(&fs, d.inode, "f", 0o644, RW).expect("operation succeeds");
    release(&fs, f.inode, fh);
    assert_eq!(errno(fs.rmdir(&root(), ROOT, &c("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs.rmdir(&root(), d.inode, &c("f"))), libc::ENOTDIR);
    fs.unlink(&root(), d.inode, &c("f"))
        .expect("operation succeeds");
    fs.rmdir(&root(), ROOT, &c("d"))
        .expect("operation succeeds");
    assert_eq!(getattr(&fs, ROOT).st_nlink, 2);
    assert_eq!(errno(create(&fs, d.inode, "g", 0o644, RW)), libc::ENOENT);
}

#[test]
fn truncate_shrinks_and_extends_with_zeros_and_times_follow_setattr() {
    let fs = fs();
    let (e, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"0123456789").expect("operation succeeds");
    release(&fs, e.inode, fh);
    set_size(&fs, e.inode, 4).expect("operation succeeds");
    set_size(&fs, e.inode, 8).expect("operation succeeds");
    assert_eq!(contents(&fs, e.inode), b"0123\0\0\0\0");
    let mut attr = getattr(&fs, e.inode);
    attr.st_mtime = 1_000_000;
    attr.st_mtime_nsec = 5;
    attr.st_atime = 2_000_000;
    let valid = SetattrValid::MTIME | SetattrValid::ATIME;
    let st = fs
        .setattr(&root(), e.inode, attr, None, valid)
        .expect("operation succeeds")
        .0;
    assert_eq!(
        (st.st_mtime, st.st_mtime_nsec, st.st_atime),
        (1_000_000, 5, 2_000_000)
    );
    let st = fs
        .setattr(
            &root(),
            e.inode,
            attr,
            None,
            SetattrValid::MTIME | SetattrValid::MTIME_NOW,
        )
        .expect("operation succeeds")
        .0;
    assert!(st.st_mtime > 1_600_000_000, "MTIME_NOW uses the clock");
    attr.st_mode = 0o4755;
    attr.st_uid = 42;
    let valid = SetattrValid::MODE | SetattrValid::UID;
    let st = fs
        .setattr(&root(), e.inode, attr, None, valid)
        .expect("operation succeeds")
        .0;
    assert_eq!(st.st_uid, 42);
    assert_eq!(st.st_mode, libc::S_IFREG | 0o4755);
    let d = mkdir(&fs, ROOT, "d").expect("operation succeeds");
    let mut dattr = getattr(&fs, d.inode);
    dattr.st_size = 10;
    let r = fs.setattr(&root(), d.inode, dattr, None, SetattrValid::SIZE);
    assert_eq!(errno(r), libc::EISDIR);
}

#[test]
fn offsets_past_4_gib_are_sparse() {
    let fs = MemFs::new(16 * 1024 * 1024);
    let (e, fh) = create(&fs, ROOT, "big", 0o644, RW).expect("operation succeeds");
    let off = 5 * GIB + 123;
    write(&fs, e.inode, fh, off, b"far away").expect("operation succeeds");
    write(&fs, e.inode, fh, 4 * GIB - 2, b"edge").expect("operation succeeds");
    assert_eq!(getattr(&fs, e.inode).st_size as u64, off + 8);
    assert_eq!(
        read(&fs, e.inode, fh, off, 100).expect("operation succeeds"),
        b"far away"
    );
    assert_eq!(
        read(&fs, e.inode, fh, 4 * GIB - 4, 8).expect("operation succeeds"),
        b"\0\0edge\0\0"
    );
    assert_eq!(
        read(&fs, e.inode, fh, 3 * GIB, 4).expect("operation succeeds"),
        b"\0\0\0\0"
    );
    assert!(
        fs.used_bytes() < 1024 * 1024,
        "the gap is not stored: {}",
        fs.used_bytes()
    );
    release(&fs, e.inode, fh);
}

#[test]
fn directory_of_100k_entries_lists_completely_in_linear_time() {
    let fs = MemFs::new(1 << 30);
    let d = mkdir(&fs, ROOT, "many").expect("operation succeeds");
    let n = 100_000;
    for i in 0..n {
        let e = fs
            .mknod(
                &root(),
                d.inode,
                &c(&format!("f{i:06}")),
                libc::S_IFREG | 0o644,
                0,
                0,
            )
            .expect("operation succeeds");
        fs.forget(&root(), e.inode, 1);
    }
    let start = std::time::Instant::now();
    // 100 entries per call like a 4 KiB getdents buffer: 1,000 calls.
    let listed = list(&fs, d.inode, 100);
    let took = start.elapsed();
    eprintln!("listed {n} entries in {took:?}");
    assert_eq!(listed.len(), n);
    let mut seen: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), n, "every entry exactly once");
    // Quadratic listing (rescanning from the start each call) takes minutes here.
    assert!(took.as_secs() < 10, "listing took {took:?}");
}

#[test]
fn changes_during_a_listing_do_not_skip_or_repeat_other_entries() {
    let fs = fs();
    for i in 0..50 {
        let (e, fh) =
            create(&fs, ROOT, &format!("e{i:02}"), 0o644, RW).expect("operation succeeds");
        release(&fs, e.inode, fh);
    }
    let mut offset = 0;
    let mut seen = Vec::new();
    let mut first = true;
    loop {
        let mut got = 0;
        fs.readdir(&root(), ROOT, 0, 4096, offset, &mut |d| {
            if got == 10 {
                return Ok(0);
            }
            got += 1;
            offset = d.offset;
            seen.push(String::from_utf8_lossy(d.name).into_owned());
            Ok(1)
        })
        .expect("operation succeeds");
        if got == 0 {
            break;
        }
        if first {
            first = false;
            // Remove one not yet listed and one already listed, add a new one.
            fs.unlink(&root(), ROOT, &c("e40"))
                .expect("operation succeeds");
            fs.unlink(&root(), ROOT, &c("e01"))
                .expect("operation succeeds");
            let (e, fh) = create(&fs, ROOT, "new", 0o644, RW).expect("operation succeeds");
            release(&fs, e.inode, fh);
        }
    }
    for i in 0..50 {
        let name = format!("e{i:02}");
        let count = seen.iter().filter(|s| **s == name).count();
        let expected = usize::from(name != "e40");
        assert_eq!(count, expected, "{name}");
    }
}

#[test]
fn quota_enospc_then_recovery_after_unlink() {
    let quota = 256 * 1024;
    let fs = MemFs::new(quota);
    let st = fs.statfs(&root(), ROOT).expect("operation succeeds");
    assert_eq!(st.f_blocks * st.f_bsize, quota);
    let (e, fh) = create(&fs, ROOT, "fill", 0o644, RW).expect("operation succeeds");
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    let err = loop {
        match write(&fs, e.inode, fh, written, &chunk) {
            Ok(n) => written += n as u64,
            Err(err) => break err,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert!(written >= 128 * 1024 && written < quota);
    let (e2, fh2) = create(&fs, ROOT, "small", 0o644, RW).expect("operation succeeds");
    assert_eq!(errno(write(&fs, e2.inode, fh2, 0, &chunk)), libc::ENOSPC);
    let free = fs
        .statfs(&root(), ROOT)
        .expect("operation succeeds")
        .f_bfree;
    release(&fs, e.inode, fh);
    fs.unlink(&root(), ROOT, &c("fill"))
        .expect("operation succeeds");
    fs.forget(&root(), e.inode, 1);
    assert!(
        fs.statfs(&root(), ROOT)
            .expect("operation succeeds")
            .f_bfree
            > free
    );
    assert_eq!(
        write(&fs, e2.inode, fh2, 0, &chunk).expect("operation succeeds"),
        chunk.len()
    );
    // Truncation gives quota back too.
    let used = fs.used_bytes();
    set_size(&fs, e2.inode, 0).expect("operation succeeds");
    assert_eq!(fs.used_bytes(), used - chunk.len() as u64);
    release(&fs, e2.inode, fh2);
}

#[test]
fn forget_and_open_handles_keep_unlinked_inodes_alive() {
    let fs = fs();
    let base = fs.inode_count();
    let (e, fh) = create(&fs, ROOT, "tmp", 0o644, RW).expect("operation succeeds");
    write(&fs, e.inode, fh, 0, b"still here").expect("operation succeeds");
    // A second kernel reference.
    lookup(&fs, ROOT, "tmp").expect("operation succeeds");
    fs.unlink(&root(), ROOT, &c("tmp"))
        .expect("operation succeeds");
    assert_eq!(errno(lookup(&fs, ROOT, "tmp")), libc::ENOENT);
    assert_eq!(
        read(&fs, e.inode, fh, 0, 100).expect("operation succeeds"),
        b"still here"
    );
    assert_eq!(getattr(&fs, e.inode).st_nlink, 0);
    fs.forget(&root(), e.inode, 2);
    assert_eq!(fs.inode_count(), base + 1, "open handle keeps it");
    release(&fs, e.inode, fh);
    assert_eq!(fs.inode_count(), base, "freed once nothing refers to it");
    assert_eq!(errno(fs.getattr(&root(), e.inode, None)), libc::ENOENT);

    // readdirplus hands out references too.
    let (f, fh) = create(&fs, ROOT, "listed", 0o644, RW).expect("operation succeeds");
    release(&fs, f.inode, fh);
    fs.forget(&root(), f.inode, 1);
    let mut plus = 0;
    fs.readdirplus(&root(), ROOT, 0, 4096, 0, &mut |d, e| {
        if d.name == b"listed" {
            assert_eq!(e.inode, f.inode);
            plus += 1;
        }
        Ok(1)
    })
    .expect("operation succeeds");
    assert_eq!(plus, 1);
    fs.unlink(&root(), ROOT, &c("listed"))
        .expect("operation succeeds");
    assert_eq!(fs.inode_count(), base + 1, "readdirplus reference keeps it");
    fs.forget(&root(), f.inode, 1);
    assert_eq!(fs.inode_count(), base);
}

#[test]
fn concurrent_writers_from_threads() {
    let fs = Arc::new(MemFs::new(256 * 1024 * 1024));
    let (shared, sfh) = create(&*fs, ROOT, "shared", 0o644, RW).expect("operation succeeds");
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || {
                let (own, fh) =
                    create(&*fs, ROOT, &format!("own{t}"), 0o644, RW).expect("operation succeeds");
                for i in 0..200u64 {
                    let block = vec![t; 1000];
                    write(&*fs, own.inode, fh, i * 1000, &block).expect("operation succeeds");
                    write(
                        &*fs,
                        shared.inode,
                        sfh,
                        (i * 8 + u64::from(t)) * 100,
                        &block[..100],
                    )
                    .expect("operation succeeds");
                }
                release(&*fs, own.inode, fh);
                own.inode
            })
        })
        .collect();
    let inos: Vec<u64> = threads
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .collect();
    for (t, ino) in inos.into_iter().enumerate() {
        let data = contents(&*fs, ino);
        assert_eq!(data.len(), 200_000);
        assert!(data.iter().all(|b| usize::from(*b) == t));
    }
    let data = contents(&*fs, shared.inode);
    assert_eq!(data.len(), 200 * 8 * 100);
    for (i, block) in data.chunks(100).enumerate() {
        assert!(block.iter().all(|b| usize::from(*b) == i % 8), "block {i}");
    }
    release(&*fs, shared.inode, sfh);
}

#[test]
fn setgid_directories_pass_on_their_group_and_access_follows_mode() {
    let fs = fs();
    let d = mkdir(&fs, ROOT, "shared").expect("operation succeeds");
    let mut attr = d.attr;
    attr.st_mode = 0o2775;
    attr.st_gid = 500;
    let valid = SetattrValid::MODE | SetattrValid::GID;
    fs.setattr(&root(), d.inode, attr, None, valid)
        .expect("operation succeeds");
    let (f, fh) =
        create_as(&fs, &ctx(1000, 1000), d.inode, "f", 0o640, RW).expect("operation succeeds");
    release(&fs, f.inode, fh);
    assert_eq!(f.attr.st_gid, 500);
    let sub = fs
        .mkdir(&ctx(1000, 1000), d.inode, &c("sub"), 0o755, 0)
        .expect("operation succeeds");
    assert_eq!(sub.attr.st_mode & libc::S_ISGID, libc::S_ISGID);
    fs.access(
        &ctx(1000, 1),
        f.inode,
        libc::R_OK as u32 | libc::W_OK as u32,
    )
    .expect("operation succeeds");
    assert_eq!(
        errno(fs.access(&ctx(7, 500), f.inode, libc::W_OK as u32)),
        libc::EACCES
    );
    fs.access(&ctx(7, 500), f.inode, libc::R_OK as u32)
        .expect("operation succeeds");
    assert_eq!(
        errno(fs.access(&ctx(7, 7), f.inode, libc::R_OK as u32)),
        libc::EACCES
    );
    assert_eq!(
        errno(fs.access(&root(), f.inode, libc::X_OK as u32)),
        libc::EACCES
    );
}

#[test]
fn unknown_handles_and_inodes_fail_cleanly() {
    let fs = fs();
    let (e, fh) = create(&fs, ROOT, "f", 0o644, RW).expect("operation succeeds");
    assert_eq!(errno(read(&fs, e.inode, fh + 100, 0, 10)), libc::EBADF);
    assert_eq!(errno(write(&fs, e.inode + 1, fh, 0, b"x")), libc::EBADF);
    assert_eq!(errno(lookup(&fs, 999_999, "x")), libc::ENOENT);
    assert_eq!(errno(lookup(&fs, e.inode, "x")), libc::ENOTDIR);
    assert_eq!(errno(open(&fs, ROOT, WO)), libc::EISDIR);
    release(&fs, e.inode, fh);
    // Releasing twice is harmless.
    release(&fs, e.inode, fh);
}
