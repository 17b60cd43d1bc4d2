//! Named volumes and extra disks (reference §1.18, §1.3.4, §13.1 scenarios 48-51): the
//! `volume` commands' outputs and errors, `cp` keeping owner/mode/mtime and holes, data
//! persisting across runs through `--disk @NAME`, read-only mounts, and exclusive attach
//! (a disk attached read-write to a running sandbox is refused elsewhere; read-only shares).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use common::{env, ok, stderr, stdout};

fn volumes_dir() -> PathBuf {
    env().home.path().join(".cache/matchlock/volumes")
}

#[track_caller]
fn fails_with(o: &std::process::Output, msg: &str) {
    assert!(!o.status.success(), "expected failure, got: {}", stdout(o));
    assert!(stderr(o).contains(msg), "want {msg:?} in: {}", stderr(o));
}

#[test]
fn volume_commands_outputs_and_errors() {
    let e = env();
    let out = ok(&e.run(&["volume", "create", "cli-a", "--size", "16"]));
    assert_eq!(out, "Created volume cli-a (16.0 MB)\n");
    let out = ok(&e.run(&["volume", "create", " cli-b ", "--size", "8", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["name"], "cli-b");
    assert_eq!(v["size"], "8.0 MB");
    let path = PathBuf::from(v["path"].as_str().expect("path"));
    assert_eq!(path, volumes_dir().join("cli-b.ext4"));
    let meta = std::fs::metadata(&path).expect("image");
    assert_eq!(meta.len(), 8 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    // ext4 superblock magic at 1024 + 56.
    let head = std::fs::read(&path).expect("read");
    assert_eq!(head.get(1080..1082), Some(&[0x53, 0xEF][..]));

    let ls = ok(&e.run(&["volume", "ls"]));
    assert!(ls.starts_with("NAME"), "{ls}");
    assert!(!ls.contains("PATH"), "{ls}");
    let a = ls.find("cli-a").expect("cli-a listed");
    let b = ls.find("cli-b").expect("cli-b listed");
    assert!(a < b, "sorted by name: {ls}");
    assert!(ls.contains("16.0 MB") && ls.contains("8.0 MB"), "{ls}");
    let js: serde_json::Value =
        serde_json::from_str(&ok(&e.run(&["volume", "list", "--json"]))).expect("ls json");
    let names: Vec<&str> = js
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(names.contains(&"cli-a") && names.contains(&"cli-b"), "{js}");

    fails_with(
        &e.run(&["volume", "create", "cli-a", "--size", "16"]),
        "named volume already exists: cli-a",
    );
    fails_with(
        &e.run(&["volume", "create", "../evil"]),
        "invalid volume name: \"../evil\" (allowed: alphanumeric, '_', '.', '-', must start with alphanumeric)",
    );
    fails_with(
        &e.run(&["volume", "create", " "]),
        "invalid volume name: name cannot be empty",
    );
    fails_with(&e.run(&["volume", "create", "z", "--size", "0"]), "> 0");
    fails_with(
        &e.run(&["volume", "cp", "cli-a", "cli-a"]),
        "copy named volume: source and destination must be different",
    );
    fails_with(
        &e.run(&["volume", "cp", "cli-missing", "cli-x"]),
        "named volume not found: cli-missing",
    );
    fails_with(
        &e.run(&["volume", "cp", "cli-a", "cli-b"]),
        "named volume already exists: cli-b",
    );
    // Another HOME has no such volume.
    let other = tempfile::tempdir().expect("tmp");
    let o = e
        .cmd()
        .env("HOME", other.path())
        .env("XDG_CACHE_HOME", other.path().join(".cache"))
        .args(["volume", "cp", "cli-a", "cli-c"])
        .output()
        .expect("run");
    fails_with(&o, "named volume not found");

    assert_eq!(
        ok(&e.run(&["volume", "remove", "cli-b"])),
        "Removed volume cli-b\n"
    );
    assert!(!ok(&e.run(&["volume", "ls"])).contains("cli-b"));
    fails_with(
        &e.run(&["volume", "rm", "cli-b"]),
        "named volume not found: cli-b",
    );
    fails_with(
        &e.sandbox(&["--no-network", "--disk", "@cli-b:/data", "--", "true"]),
        "invalid disk mount \"@cli-b:/data\": named volume not found: cli-b",
    );
    fails_with(
        &e.sandbox(&["--no-network", "--disk", "@a/b:/data", "--", "true"]),
        "invalid volume name",
    );
    // One image twice in one sandbox: read-only twice is fine, read-write twice is not.
    fails_with(
        &e.sandbox(&[
            "--no-network",
            "--disk",
            "@cli-a:/a",
            "--disk",
            "@cli-a:/b:ro",
            "--",
            "true",
        ]),
        "named volume \"cli-a\" is attached twice to this sandbox",
    );
}

#[test]
fn copy_keeps_owner_mode_mtime_and_holes() {
    let e = env();
    ok(&e.run(&["volume", "create", "cp-src", "--size", "1024"]));
    let src = volumes_dir().join("cp-src.ext4");
    // Some data in the middle of the hole, then owner, then mode (chown clears setuid).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 1 << 20], 700 << 20).expect("write");
    drop(f);
    std::os::unix::fs::chown(&src, Some(1234), Some(5678)).expect("chown");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o6751)).expect("chmod");
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_577_923_200);
    let f = std::fs::File::options()
        .write(true)
        .open(&src)
        .expect("open");
    f.set_times(std::fs::FileTimes::new().set_modified(mtime))
        .expect("set mtime");
    drop(f);

    let out = ok(&e.run(&["volume", "copy", "cp-src", "cp-dst"]));
    assert_eq!(out, "Copied volume cp-src to cp-dst\n");
    let dst = volumes_dir().join("cp-dst.ext4");
    let (s, d) = (
        std::fs::metadata(&src).expect("src"),
        std::fs::metadata(&dst).expect("dst"),
    );
    assert_eq!((d.uid(), d.gid()), (1234, 5678));
    assert_eq!(d.mode() & 0o7777, 0o6751);
    assert_eq!(d.mtime(), s.mtime());
    assert_eq!(d.len(), 1 << 30, "apparent size kept");
    let allocated = d.blocks() * 512;
    assert!(
        allocated <= s.blocks() * 512 + (1 << 20),
        "copy inflated: {allocated} bytes allocated vs {} in the source",
        s.blocks() * 512
    );
    assert!(allocated < 64 << 20, "copy inflated: {allocated}");
    let same = std::process::Command::new("cmp")
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("cmp");
    assert!(same.success(), "contents differ");
    ok(&e.run(&["volume", "rm", "cp-src"]));
    ok(&e.run(&["volume", "rm", "cp-dst"]));
}

/// One volume through several sandboxes: written in one run and read in the next, a
/// read-only attachment shared but refused read-write, a read-write one refused everywhere,
/// `rm`/`cp` refused while attached, and a crashed owner's lock released.
#[test]
fn data_persists_and_attach_is_exclusive() {
    let e = env();
    ok(&e.run(&["volume", "create", "data", "--size", "32"]));
    let write = "echo persisted > /data/abc && chmod 640 /data/abc";
    ok(&e.sandbox(&[
        "--no-network",
        "--disk",
        "@data:/data",
        "--",
        "sh",
        "-c",
        write,
    ]));

    // Read-only holder: reads the data of the previous run, cannot write.
    let ro = e.detached(&["--no-network", "--disk", "@data:/data:ro"]);
    let _g = e.guard(&ro);
    let out = ok(&e.run(&[
        "exec",
        &ro,
        "--",
        "sh",
        "-c",
        "cat /data/abc; stat -c %a /data/abc",
    ]));
    assert_eq!(out, "persisted\n640\n");
    let o = e.run(&["exec", &ro, "--", "sh", "-c", "echo x > /data/new"]);
    assert!(!o.status.success(), "write to a :ro disk succeeded");
    assert!(
        format!("{}{}", stdout(&o), stderr(&o)).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    fails_with(
        &e.sandbox(&["--no-network", "--disk", "@data:/data", "--", "true"]),
        &format!("named volume \"data\" is attached read-only to another running sandbox ({ro})"),
    );
    fails_with(
        &e.run(&["volume", "rm", "data"]),
        &format!("named volume \"data\" is attached to running sandbox {ro}"),
    );
    ok(&e.run(&["volume", "cp", "data", "data-ro-copy"]));
    // Read-only attachments share.
    let out = ok(&e.sandbox(&[
        "--no-network",
        "--disk",
        "@data:/d:ro",
        "--",
        "cat",
        "/d/abc",
    ]));
    assert_eq!(out, "persisted\n");
    e.kill_and_rm(&ro);

    // Read-write holder: nothing else may attach it, by name or by another path.
    let rw = e.detached(&["--no-network", "--disk", "@data:/data"]);
    let _g2 = e.guard(&rw);
    let held = format!("is attached read-write to another running sandbox ({rw})");
    fails_with(
        &e.sandbox(&["--no-network", "--disk", "@data:/data:ro", "--", "true"]),
        &format!("named volume \"data\" {held}"),
    );
    let link = e.home.path().join("data-link.img");
    std::fs::hard_link(volumes_dir().join("data.ext4"), &link).expect("link");
    let spec = format!("{}:/x", link.display());
    fails_with(
        &e.sandbox(&["--no-network", "--disk", &spec, "--", "true"]),
        &format!("disk \"{}\" {held}", link.display()),
    );
    fails_with(&e.run(&["volume", "cp", "data", "data-2"]), &held);
    assert!(
        !volumes_dir().join("data-2.ext4").exists(),
        "failed cp left a file"
    );
    fails_with(
        &e.run(&["volume", "rm", "data"]),
        "attached to running sandbox",
    );

    // The owner crashes: the kernel drops its lock with it.
    let pid = i32::try_from(e.owner_pid(&rw)).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill owner");
    matchlock_test_support::wait_until(Duration::from_secs(30), "owner gone", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .expect("owner exit");
    ok(&e.run(&["gc", &rw]));
    ok(&e.run(&["rm", &rw]));
    // Read-write again: the exclusive lock is free.
    let spec = format!("{}:/x", link.display());
    let out = ok(&e.sandbox(&["--no-network", "--disk", &spec, "--", "cat", "/x/abc"]));
    assert_eq!(out, "persisted\n");
    std::fs::remove_file(&link).expect("unlink");
    ok(&e.run(&["volume", "rm", "data"]));
    ok(&e.run(&["volume", "rm", "data-ro-copy"]));
}

/// RPC `create` with `extra_disks` (a plain host path, as the SDKs send it) takes the same
/// lock: while it holds a volume read-write a CLI run cannot attach it; `close` frees it.
#[test]
fn rpc_sandbox_holds_its_disk() {
    let e = env();
    ok(&e.run(&["volume", "create", "rpcvol", "--size", "16"]));
    let path = volumes_dir().join("rpcvol.ext4");
    let mut r = common::rpc::Rpc::start();
    let created = r.call(
        "create",
        serde_json::json!({
            "image": common::IMAGE,
            "network": {"no_network": true},
            "extra_disks": [{"host_path": path, "guest_mount": "/v"}],
        }),
        1,
    );
    let id = created["id"].as_str().expect("vm id").to_string();
    let v = r.call(
        "exec",
        serde_json::json!({"command": "echo from-rpc > /v/f"}),
        2,
    );
    assert_eq!(v["exit_code"], 0, "{v}");
    fails_with(
        &e.sandbox(&["--no-network", "--disk", "@rpcvol:/v:ro", "--", "true"]),
        &format!(
            "named volume \"rpcvol\" is attached read-write to another running sandbox ({id})"
        ),
    );
    r.call("close", serde_json::json!({}), 3);
    let out = ok(&e.sandbox(&[
        "--no-network",
        "--disk",
        "@rpcvol:/v:ro",
        "--",
        "cat",
        "/v/f",
    ]));
    assert_eq!(out, "from-rpc\n");
    assert!(r.finish().success());
    ok(&e.run(&["volume", "rm", "rpcvol"]));
}
