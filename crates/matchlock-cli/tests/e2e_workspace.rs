//! `--workspace` and `-v` end to end: host directories served to a real VM over virtio-fs by
//! the sandbox owner (spec §1.3.3, §13.1 scenarios 10-12 and 17, §13.2 scenario 89), the
//! escape suite (symlinks planted by the host, `..`, device nodes, set-id bits) and the
//! reference's messages for bad specs.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{env, ok, stderr, stdout};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Scenarios 10, 11 and 12 in one VM: a mount at a guest path that does not exist in the
/// image, a relative multi-level read-only mount (intermediate directory synthesised) and a
/// single-file mount; the command runs in the workspace by default.
#[test]
fn nested_relative_and_single_file_mounts() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let nested = tmp.path().join("nested");
    let multi = tmp.path().join("multi");
    std::fs::create_dir_all(&nested).expect("mkdir");
    std::fs::create_dir_all(&multi).expect("mkdir");
    std::fs::write(nested.join("probe.txt"), "mounted-nested-path").expect("write");
    std::fs::write(multi.join("TEST.md"), "mounted-multi-level-path").expect("write");
    let file = tmp.path().join("single.txt");
    std::fs::write(&file, "single-file-mounted").expect("write");
    std::fs::write(tmp.path().join("beside.txt"), "not shared").expect("write");
    let v1 = format!("{}:/workspace/not_exist_folder:host_fs", s(&nested));
    let v2 = format!("{}:.host/example:ro", s(&multi));
    let v3 = format!("{}:/workspace/1file.txt:host_fs", s(&file));
    let out = ok(&e.sandbox(&[
        "--workspace",
        "/workspace",
        "-v",
        &v1,
        "-v",
        &v2,
        "-v",
        &v3,
        "--",
        "sh",
        "-c",
        "pwd; cat /workspace/not_exist_folder/probe.txt; echo; \
         cd /workspace/.host && cat example/TEST.md; echo; \
         ls /workspace && cat /workspace/1file.txt; echo; \
         ls /workspace/1file.txt/.. 2>&1 | head -1",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"/workspace"),
        "cwd defaults to the workspace: {out}"
    );
    assert_eq!(lines.get(1), Some(&"mounted-nested-path"), "{out}");
    assert_eq!(lines.get(2), Some(&"mounted-multi-level-path"), "{out}");
    assert!(out.contains("1file.txt"), "{out}");
    assert!(out.contains("single-file-mounted"), "{out}");
    assert!(
        !out.contains("beside.txt"),
        "the file's directory leaked: {out}"
    );
}

/// Scenario 17, the run flow's step 8 messages and a disk inside the workspace (step 9).
#[test]
fn bad_specs_are_refused_with_the_reference_messages() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = s(tmp.path());
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, b"").expect("disk");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--workspace".into(),
                "/workspace/project".into(),
                "-v".into(),
                format!("{dir}:/workspace:host_fs"),
            ],
            "must be within workspace",
        ),
        (
            vec!["-v".into(), format!("{dir}:/workspace:host_fs")],
            "--workspace is required when using --volume",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{dir}/missing:/workspace/x"),
            ],
            "host path does not exist",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{dir}:/workspace/x:rw"),
            ],
            "unknown option \"rw\" (use 'ro', 'overlay', or 'host_fs')",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                dir.to_string(),
            ],
            "expected format host:guest or host:guest:ro",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{dir}:../etc:host_fs"),
            ],
            "must be within workspace",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{dir}:/workspace-cache:host_fs"),
            ],
            "must be within workspace",
        ),
        (
            vec!["--workspace".into(), "/workspace".into()],
            "vfs.workspace requires at least one vfs.mounts entry",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{dir}:/workspace:host_fs"),
                "--disk".into(),
                format!("{}:/workspace/data", s(&disk)),
            ],
            "is inside workspace \"/workspace\" and will be shadowed by the VFS mount",
        ),
        (
            vec![
                "--workspace".into(),
                "/workspace".into(),
                "-v".into(),
                format!("{}:/workspace/o", s(&disk)),
            ],
            "single-file overlay mounts are not supported",
        ),
    ];
    for (args, want) in cases {
        let mut full: Vec<&str> = args.iter().map(String::as_str).collect();
        full.extend(["--", "true"]);
        let o = e.sandbox(&full);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        if want.contains("within workspace")
            || want.contains("host path")
            || want.contains("option")
        {
            assert!(err.contains("invalid volume mount"), "{args:?}: {err}");
        }
    }
}

/// Runs `script` in the sandbox `id`; returns (exit code, stdout, stderr).
fn sh(id: &str, script: &str) -> (i32, String, String) {
    let o = env().run(&["exec", id, "--", "sh", "-c", script]);
    (o.status.code().unwrap_or(-1), stdout(&o), stderr(&o))
}

#[track_caller]
fn sh_ok(id: &str, script: &str) -> String {
    let (code, out, err) = sh(id, script);
    assert_eq!(code, 0, "{script}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// One VM with a read-write and a read-only host_fs mount: file semantics a toolchain needs,
/// ownership, host-side changes, and the escape suite.
#[test]
fn host_fs_semantics_and_escapes() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let rw = tmp.path().join("rw");
    let ro = tmp.path().join("ro");
    std::fs::create_dir_all(&rw).expect("mkdir");
    std::fs::create_dir_all(&ro).expect("mkdir");
    std::fs::write(ro.join("keep.txt"), "read-only-data").expect("write");
    std::fs::write(tmp.path().join("secret.txt"), "HOST-SECRET").expect("write");
    std::os::unix::fs::symlink(tmp.path().join("secret.txt"), rw.join("abs-link")).expect("ln");
    std::os::unix::fs::symlink("../secret.txt", rw.join("rel-link")).expect("ln");
    let v_rw = format!("{}:/workspace/repo:host_fs", s(&rw));
    let v_ro = format!("{}:/workspace/ro:ro", s(&ro));
    let id = e.detached(&["--workspace", "/workspace", "-v", &v_rw, "-v", &v_ro]);
    let _guard = e.guard(&id);

    // Scenario 89: write, atomic rename over an existing name, visible on the host.
    let out = sh_ok(
        &id,
        "cd /workspace/repo && echo direct > direct.txt && cat direct.txt && \
         echo old > renamed.txt && echo atomic > tmp.xyz && mv tmp.xyz renamed.txt && cat renamed.txt",
    );
    assert!(out.contains("direct") && out.contains("atomic"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rw.join("renamed.txt")).expect("host"),
        "atomic\n"
    );
    assert!(!rw.join("tmp.xyz").exists());

    // Files created by the guest's root land owned by the owner's user, not by root when
    // the owner is unprivileged.
    let meta = std::fs::metadata(rw.join("direct.txt")).expect("meta");
    let owner_uid = std::fs::metadata(tmp.path()).expect("tmp meta").uid();
    assert_eq!(meta.uid(), owner_uid);

    // A guest user other than root: the owner never switches credentials, so the file is
    // the owner's too.
    sh_ok(
        &id,
        "mkdir -p /workspace/repo/open && chmod 1777 /workspace/repo/open",
    );
    let o = e.run(&[
        "exec",
        "-u",
        "1000:1000",
        &id,
        "--",
        "sh",
        "-c",
        "id -u; echo u > /workspace/repo/open/by-1000",
    ]);
    assert_eq!(ok(&o).trim(), "1000");
    let m = std::fs::metadata(rw.join("open/by-1000")).expect("by-1000");
    assert_eq!(
        (m.uid(), m.gid()),
        (owner_uid, meta.gid()),
        "guest uid reached the host"
    );

    // Directory rename moves children; hard links, symlinks, chmod, truncate.
    sh_ok(
        &id,
        "cd /workspace/repo && mkdir -p d1/sub && echo child > d1/sub/c && mv d1 d2 && \
         ln d2/sub/c hard && ln -s d2/sub/c soft && chmod 750 direct.txt && \
         printf 0123456789 > t && truncate -s 4 t && cat soft",
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("d2/sub/c")).expect("moved"),
        "child\n"
    );
    assert!(!rw.join("d1").exists());
    assert_eq!(std::fs::metadata(rw.join("hard")).expect("hard").nlink(), 2);
    assert_eq!(
        std::fs::read_link(rw.join("soft")).expect("soft"),
        Path::new("d2/sub/c")
    );
    let mode = std::fs::metadata(rw.join("direct.txt"))
        .expect("m")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    assert_eq!(std::fs::read(rw.join("t")).expect("t"), b"0123");

    // Reference scenario 13's cwd part (no git in the busybox image): a directory removed
    // and recreated eight times, each time entered, keeps a physical cwd.
    let out = sh_ok(
        &id,
        "cd /workspace/repo && for i in 1 2 3 4 5 6 7 8; do rm -rf loop; mkdir loop; cd loop; \
         echo x > f; pwd -P; echo PWD_PHYS_EXIT:$?; cd ..; done",
    );
    assert_eq!(out.matches("PWD_PHYS_EXIT:0").count(), 8, "{out}");
    assert_eq!(out.matches("/workspace/repo/loop\n").count(), 8, "{out}");

    // Reference scenario 13's cwd part (no git in the busybox image): a directory removed
    // and recreated eight times, each time entered, keeps a physical cwd.
    let out = sh_ok(
        &id,
        "cd /workspace/repo && for i in 1 2 3 4 5 6 7 8; do rm -rf loop; mkdir loop; cd loop; \
         echo x > f; pwd -P; echo PWD_PHYS_EXIT:$?; cd ..; done",
    );
    assert_eq!(out.matches("PWD_PHYS_EXIT:0").count(), 8, "{out}");
    assert_eq!(out.matches("/workspace/repo/loop\n").count(), 8, "{out}");

    // A host-side change is visible in the guest (attribute cache: 1 s).
    std::fs::write(rw.join("from-host.txt"), "host-wrote-this").expect("write");
    std::fs::write(rw.join("direct.txt"), "changed-on-host\n").expect("write");
    let out = sh_ok(
        &id,
        "sleep 1.5; cat /workspace/repo/from-host.txt; echo; cat /workspace/repo/direct.txt",
    );
    assert!(
        out.contains("host-wrote-this") && out.contains("changed-on-host"),
        "{out}"
    );

    // Read-only mount: every write fails with EROFS, the host is unchanged.
    let (code, _, err) = sh(&id, "touch /workspace/ro/new");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, _, err) = sh(&id, "echo x >> /workspace/ro/keep.txt");
    assert_ne!(code, 0, "{err}");
    let (code, _, _) = sh(
        &id,
        "rm /workspace/ro/keep.txt || mv /workspace/ro/keep.txt /workspace/ro/k2",
    );
    assert_ne!(code, 0);
    assert_eq!(
        std::fs::read_to_string(ro.join("keep.txt")).expect("ro"),
        "read-only-data"
    );
    assert_eq!(std::fs::read_dir(&ro).expect("ls").count(), 1);
    assert_eq!(sh_ok(&id, "cat /workspace/ro/keep.txt"), "read-only-data");

    // Device nodes are refused; set-id bits are stripped.
    let (code, _, err) = sh(&id, "mknod /workspace/repo/null c 1 3");
    assert_ne!(code, 0, "mknod of a char device succeeded");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(!rw.join("null").exists());
    sh_ok(
        &id,
        "cd /workspace/repo && echo x > suid && chmod 4755 suid && mkfifo fifo",
    );
    let mode = std::fs::metadata(rw.join("suid"))
        .expect("m")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "set-uid bit reached the host");

    // Symlinks planted by the host that point outside are symlinks in the guest and resolve
    // in the guest's own tree: the host file is never read.
    sh_ok(&id, "mkdir -p /tmp && echo guest-own > /tmp/secret.txt");
    let out = sh_ok(
        &id,
        "cd /workspace/repo && readlink abs-link; readlink rel-link; \
         cat abs-link 2>&1; cat rel-link 2>&1; true",
    );
    assert!(
        !out.contains("HOST-SECRET"),
        "host file read through a symlink: {out}"
    );
    assert!(out.contains("secret.txt"), "{out}");
    // `..` cannot leave the share: the mount root's parent is the workspace.
    let out = sh_ok(
        &id,
        "ls -a /workspace/repo/..; cat /workspace/repo/../secret.txt 2>&1; true",
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
    assert!(out.contains("ro") && out.contains("repo"), "{out}");
    // A symlink the guest creates pointing outside also stays in the guest's view.
    let out = sh_ok(
        &id,
        &format!(
            "ln -s {} /workspace/repo/g-link && cat /workspace/repo/g-link 2>&1; true",
            s(&tmp.path().join("secret.txt"))
        ),
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
}

/// An unprivileged owner (uid 65534, via `setpriv`): what the guest's root creates in a
/// host_fs share lands owned by that uid, and the guest cannot give it to root.
#[test]
fn unprivileged_owner_owns_what_the_guest_creates() {
    const UID: u32 = 65534;
    let e = env();
    let home = tempfile::Builder::new()
        .prefix("matchlock-unpriv-")
        .tempdir_in("/tmp")
        .expect("home");
    let h = home.path();
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Assets the unprivileged owner can read (the defaults live under /root).
    let template = e.cmd();
    let var = |k: &str| {
        template
            .get_envs()
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v)
            .map(std::path::PathBuf::from)
            .expect("harness env")
    };
    let kernel = h.join("vmlinux");
    let guest = h.join("matchlock-guest");
    std::fs::copy(var("MATCHLOCK_KERNEL"), &kernel).expect("kernel");
    std::fs::copy(var("MATCHLOCK_GUEST_INIT"), &guest).expect("guest");
    let bin_dir = h.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin");
    let vsock = which("vhost-device-vsock");
    std::fs::copy(&vsock, bin_dir.join("vhost-device-vsock")).expect("vsock helper");
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir.display());
    let cmd = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_matchlock"));
        c.env("HOME", h)
            .env("XDG_CACHE_HOME", h.join(".cache"))
            .env("MATCHLOCK_KERNEL", &kernel)
            .env("MATCHLOCK_GUEST_INIT", &guest)
            .env("MATCHLOCK_QUIET_ACCEL", "1")
            .env("PATH", &path)
            .env_remove("MATCHLOCK_ACCEL")
            .args(args);
        c
    };
    let mut archive = Vec::new();
    matchlock_test_support::busybox_image(&mut archive).expect("image");
    let mut import = cmd(&["image", "import", common::IMAGE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("import");
    {
        use std::io::Write;
        let mut stdin = import.stdin.take().expect("stdin");
        stdin.write_all(&archive).expect("archive");
    }
    ok(&import.wait_with_output().expect("import"));
    let share = h.join("share");
    std::fs::create_dir_all(&share).expect("share");
    let o = std::process::Command::new("chown")
        .args(["-R", &format!("{UID}:{UID}")])
        .arg(h)
        .output()
        .expect("chown");
    ok(&o);
    let v = format!("{}:/workspace:host_fs", share.display());
    let run = cmd(&[
        "run",
        "--image",
        common::IMAGE,
        "--workspace",
        "/workspace",
        "-v",
        &v,
        "--",
        "sh",
        "-c",
        "id -u; echo made > /workspace/made; mkdir /workspace/dir; \
         chown 0:0 /workspace/made 2>&1; cat /workspace/made",
    ]);
    let args: Vec<std::ffi::OsString> = std::iter::once(run.get_program().to_os_string())
        .chain(run.get_args().map(|a| a.to_os_string()))
        .collect();
    let mut priv_cmd = std::process::Command::new("setpriv");
    priv_cmd
        .args([
            format!("--reuid={UID}"),
            format!("--regid={UID}"),
            "--clear-groups".to_string(),
            "--".to_string(),
        ])
        .args(&args)
        .envs(run.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .stdin(std::process::Stdio::null());
    let out = ok(&priv_cmd.output().expect("setpriv"));
    assert!(
        out.starts_with("0\n"),
        "the guest command runs as root: {out}"
    );
    assert!(out.contains("made"), "{out}");
    for f in ["made", "dir"] {
        let m = std::fs::metadata(share.join(f)).expect("created on the host");
        assert_eq!(
            (m.uid(), m.gid()),
            (UID, UID),
            "{f} owned by the owner's user"
        );
    }
}

fn which(name: &str) -> std::path::PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    path.split(':')
        .map(std::path::PathBuf::from)
        .chain([Path::new(&home).join(".cargo/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found in PATH or ~/.cargo/bin"))
}
