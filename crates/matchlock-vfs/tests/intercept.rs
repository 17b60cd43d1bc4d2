//! The interception layer over the real router and a real host directory (PassthroughFs),
//! driven through the FUSE filesystem trait exactly as the virtio-fs server drives it.

use std::ffi::CString;
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use matchlock_vfs::intercept::{
    rules::RuleWire, FileEvent, Intercept, InterceptionWire, Op, Rules,
};

const ROOT: u64 = 1;

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

struct Fixture {
    _dir: tempfile::TempDir,
    host: std::path::PathBuf,
    fs: Intercept<Vfs>,
    events: Arc<Mutex<Vec<FileEvent>>>,
    ctx: Context,
}

fn fixture(rules: Vec<RuleWire>, emit_events: bool) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().to_path_buf();
    let pfs: PassthroughFs<()> = PassthroughFs::new(Config {
        root_dir: host.to_string_lossy().into_owned(),
        do_import: true,
        ..Default::default()
    })
    .expect("passthrough");
    pfs.import().expect("import");
    let vfs = Vfs::new(VfsOptions::default());
    vfs.mount(Box::new(pfs), "/").expect("mount");
    vfs.init(FsOptions::empty()).expect("init");
    let compiled = Rules::compile(&InterceptionWire { emit_events, rules })
        .expect("compiles")
        .expect("engine");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    let sink = Arc::new(move |e: FileEvent| sink_events.lock().expect("lock").push(e));
    Fixture {
        _dir: dir,
        host,
        fs: Intercept::new(vfs, compiled, "/workspace", Some(sink)),
        events,
        ctx: Context::new(),
    }
}

fn block(ops: &[&str], path: &str) -> RuleWire {
    RuleWire {
        name: format!("block {path}"),
        phase: "before".into(),
        ops: ops.iter().map(|s| s.to_string()).collect(),
        path: path.into(),
        action: "block".into(),
        timeout_ms: 0,
    }
}

fn create_args() -> CreateIn {
    CreateIn {
        flags: (libc::O_CREAT | libc::O_RDWR) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0o022,
        fuse_flags: 0,
    }
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn blocked_create_never_reaches_the_host() {
    let f = fixture(vec![block(&["create"], "/workspace/blocked.txt")], true);
    let denied = f.fs.create(&f.ctx, ROOT, &c("blocked.txt"), create_args());
    assert_eq!(errno(denied), libc::EPERM);
    assert!(!f.host.join("blocked.txt").exists());
    let ok = f.fs.create(&f.ctx, ROOT, &c("ok.txt"), create_args());
    assert!(ok.is_ok(), "{:?}", ok.err());
    assert!(f.host.join("ok.txt").exists());
    let events = f.events.lock().expect("lock");
    let created: Vec<_> = events.iter().filter(|e| e.op == Op::Create).collect();
    assert_eq!(created.len(), 1, "{events:?}");
    assert_eq!(created[0].path, "/workspace/ok.txt");
    assert_eq!(created[0].mode & 0o777, 0o644);
}

#[test]
fn paths_follow_directory_renames() {
    let f = fixture(vec![block(&["chmod"], "/workspace/moved/*")], true);
    let d =
        f.fs.mkdir(&f.ctx, ROOT, &c("dir"), 0o755, 0)
            .expect("mkdir");
    let (file, ..) =
        f.fs.create(&f.ctx, d.inode, &c("f"), create_args())
            .expect("create");
    let (mut attr, _) = f.fs.getattr(&f.ctx, file.inode, None).expect("getattr");
    attr.st_mode = 0o600;
    // Allowed while the directory is called "dir".
    f.fs.setattr(&f.ctx, file.inode, attr, None, SetattrValid::MODE)
        .expect("chmod allowed");
    f.fs.rename(&f.ctx, ROOT, &c("dir"), ROOT, &c("moved"), 0)
        .expect("rename");
    // The same inode is now under /workspace/moved and the rule applies.
    let denied =
        f.fs.setattr(&f.ctx, file.inode, attr, None, SetattrValid::MODE);
    assert_eq!(errno(denied), libc::EPERM);
    let events = f.events.lock().expect("lock");
    assert!(events
        .iter()
        .any(|e| e.op == Op::Rename && e.path == "/workspace/dir"));
    assert!(events
        .iter()
        .any(|e| e.op == Op::Chmod && e.path == "/workspace/dir/f"));
}

#[test]
fn rename_into_a_protected_name_is_refused() {
    let f = fixture(vec![block(&["rename"], "/workspace/protected")], false);
    f.fs.create(&f.ctx, ROOT, &c("a"), create_args())
        .expect("create");
    let denied = f.fs.rename(&f.ctx, ROOT, &c("a"), ROOT, &c("protected"), 0);
    assert_eq!(errno(denied), libc::EPERM);
    assert!(f.host.join("a").exists());
    assert!(!f.host.join("protected").exists());
}

#[test]
fn unlink_and_mkdir_blocked_by_glob() {
    let f = fixture(vec![block(&["remove", "mkdir"], "/workspace/keep*")], false);
    std::fs::write(f.host.join("keep.txt"), b"x").expect("seed");
    std::fs::write(f.host.join("other.txt"), b"x").expect("seed");
    f.fs.lookup(&f.ctx, ROOT, &c("keep.txt")).expect("lookup");
    assert_eq!(
        errno(f.fs.unlink(&f.ctx, ROOT, &c("keep.txt"))),
        libc::EPERM
    );
    assert!(f.host.join("keep.txt").exists());
    assert_eq!(errno(f.fs.unlink(&f.ctx, ROOT, &c("other.txt"))), 0);
    assert_eq!(
        errno(f.fs.mkdir(&f.ctx, ROOT, &c("keepdir"), 0o755, 0)),
        libc::EPERM
    );
    assert!(!f.host.join("keepdir").exists());
}

#[test]
fn unknown_inode_fails_closed_and_forget_bounds_the_table() {
    let f = fixture(vec![block(&["stat"], "/workspace/nothing-matches")], false);
    // An inode the layer never handed out: its path is unknown, so a stat rule refuses it.
    assert_eq!(errno(f.fs.getattr(&f.ctx, 0xdead_beef, None)), libc::EPERM);
    let e = f.fs.mkdir(&f.ctx, ROOT, &c("d"), 0o755, 0).expect("mkdir");
    let again = f.fs.lookup(&f.ctx, ROOT, &c("d")).expect("lookup");
    assert_eq!(e.inode, again.inode);
    assert_eq!(f.fs.paths().len(), 1);
    f.fs.forget(&f.ctx, e.inode, 2);
    assert_eq!(f.fs.paths().len(), 0);
}

#[test]
fn without_rules_or_events_it_is_a_plain_pass_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pfs: PassthroughFs<()> = PassthroughFs::new(Config {
        root_dir: dir.path().to_string_lossy().into_owned(),
        do_import: true,
        ..Default::default()
    })
    .expect("passthrough");
    pfs.import().expect("import");
    let vfs = Vfs::new(VfsOptions::default());
    vfs.mount(Box::new(pfs), "/").expect("mount");
    vfs.init(FsOptions::empty()).expect("init");
    let fs = Intercept::new(vfs, Rules::default(), "/workspace", None);
    let ctx = Context::new();
    fs.mkdir(&ctx, ROOT, &c("d"), 0o755, 0).expect("mkdir");
    fs.create(&ctx, ROOT, &c("f"), create_args())
        .expect("create");
    fs.rename(&ctx, ROOT, &c("f"), ROOT, &c("g"), 0)
        .expect("rename");
    assert!(dir.path().join("d").is_dir());
    assert!(dir.path().join("g").is_file());
    assert!(fs.paths().is_empty(), "no table without rules or events");
}
