//! Negative entries: a lookup of a missing name through the served stack (interception over
//! the router over a real host directory) is a cacheable negative entry, not `ENOENT`; other
//! errors and block rules are unchanged, and a name the host creates later is found.

use std::ffi::CString;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::api::{Vfs, VfsOptions};
use matchlock_vfs::intercept::{rules::RuleWire, Intercept, InterceptionWire, Rules};

const ROOT: u64 = 1;

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn served(dir: &std::path::Path, rules: Rules) -> Intercept<Vfs> {
    let vfs = Vfs::new(VfsOptions::default());
    let pfs = matchlock_vfs::router::passthrough(dir).expect("passthrough");
    vfs.mount(pfs, "/").expect("mount");
    vfs.init(FsOptions::empty()).expect("init");
    Intercept::new(vfs, rules, "/workspace", None)
}

#[test]
fn missing_names_are_cacheable_negative_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = served(dir.path(), Rules::default());
    let ctx = Context::new();
    let miss = fs
        .lookup(&ctx, ROOT, &c("later.txt"))
        .expect("negative entry");
    assert_eq!(miss.inode, 0, "a miss is a negative entry");
    assert_eq!(
        miss.entry_timeout,
        matchlock_vfs::intercept::NEGATIVE_TIMEOUT
    );
    assert!(!miss.entry_timeout.is_zero());
    // The host creates the name: the next lookup (after the guest's timeout) finds it.
    std::fs::write(dir.path().join("later.txt"), "x").expect("write");
    let hit = fs.lookup(&ctx, ROOT, &c("later.txt")).expect("lookup");
    assert_ne!(hit.inode, 0);
    assert_eq!(hit.attr.st_size, 1);
    // Other failures stay errors: a name with a slash.
    let e = fs.lookup(&ctx, ROOT, &c("a/b")).expect_err("slash");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn a_blocked_lookup_is_refused_not_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = Rules::compile(&InterceptionWire {
        emit_events: false,
        rules: vec![RuleWire {
            name: "no secrets".into(),
            phase: "before".into(),
            ops: vec!["stat".into()],
            path: "/workspace/secret*".into(),
            action: "block".into(),
            timeout_ms: 0,
        }],
    })
    .expect("compiles")
    .expect("engine");
    let fs = served(dir.path(), rules);
    let ctx = Context::new();
    let e = fs
        .lookup(&ctx, ROOT, &c("secret.txt"))
        .expect_err("blocked");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert_eq!(
        fs.lookup(&ctx, ROOT, &c("other")).expect("negative").inode,
        0
    );
}
