//! Nested workspace mounts end to end (spec §9.3: the router resolves by the longest guest
//! prefix): `-v` several times with guest paths inside each other, in one real VM.

mod common;

use std::path::Path;

use common::{env, ok};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `/workspace` host_fs over a directory that has a file `sub` and a directory `a`;
/// `/workspace/sub` host_fs over another directory (it hides the outer's file);
/// `/workspace/a/b/c` overlay (`a` is the outer's, `b` synthesised). The guest sees each
/// mount point once, writes land in the provider that owns the path, nothing crosses
/// between providers, and `..` from an inner root is the outer directory.
#[test]
fn nested_mounts_resolve_by_the_longest_prefix() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let outer = tmp.path().join("outer");
    let inner = tmp.path().join("inner");
    let deep = tmp.path().join("deep");
    for d in [&outer, &inner, &deep] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(outer.join("sub"), "outer file named sub").expect("seed");
    std::fs::create_dir(outer.join("a")).expect("seed");
    std::fs::write(outer.join("a/keep"), "outer-keep").expect("seed");
    std::fs::write(outer.join("top.txt"), "outer-top").expect("seed");
    std::fs::write(inner.join("inner.txt"), "inner-file").expect("seed");
    std::fs::write(deep.join("deep.txt"), "deep-lower").expect("seed");
    let v1 = format!("{}:/workspace:host_fs", s(&outer));
    let v2 = format!("{}:/workspace/sub:host_fs", s(&inner));
    let v3 = format!("{}:/workspace/a/b/c:overlay", s(&deep));
    let script = "\
        echo \"ls=$(ls /workspace | tr '\\n' ' ')\"; \
        echo \"a=$(ls /workspace/a | tr '\\n' ' ')\"; \
        echo \"inner=$(cat /workspace/sub/inner.txt)\"; \
        echo \"keep=$(cat /workspace/a/keep)\"; \
        echo \"deep=$(cat /workspace/a/b/c/deep.txt)\"; \
        echo new-inner > /workspace/sub/new.txt; \
        echo new-deep > /workspace/a/b/c/deep.txt; \
        echo \"dotdot=$(stat -c %i /workspace/sub/..) root=$(stat -c %i /workspace)\"; \
        cd /workspace/a/b/c && echo \"up=$(cd ../.. && pwd) $(ls .. | tr '\\n' ' ')\"; \
        ln /workspace/sub/inner.txt /workspace/linked 2>&1 | sed 's/^/ln: /'; \
        rmdir /workspace/sub 2>&1 | sed 's/^/rmdir: /'; \
        mv /workspace/a /workspace/a2 2>&1 | sed 's/^/mv: /'; \
        echo \"synth=$(stat -c '%a %U %G' /workspace/a/b)\"; \
        mkdir /workspace/a/b/z 2>&1 | sed 's/^/synthmkdir: /'; \
        touch /workspace/a/b/f 2>&1 | sed 's/^/synthtouch: /'; \
        echo \"inos=$(stat -c %i /workspace/top.txt /workspace/sub/inner.txt \
            /workspace/a/b/c/deep.txt | sort -u | wc -l)\"";
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
        script,
    ]));
    let line = |key: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(line("ls"), "a sub top.txt", "{out}");
    assert_eq!(line("a"), "b keep", "{out}");
    assert_eq!(line("inner"), "inner-file", "{out}");
    assert_eq!(line("keep"), "outer-keep", "{out}");
    assert_eq!(line("deep"), "deep-lower", "{out}");
    let (dotdot, root) = line("dotdot")
        .split_once(" root=")
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or_default();
    assert_eq!(
        dotdot, root,
        "`..` of the inner root is the workspace: {out}"
    );
    assert_eq!(line("up"), "/workspace/a c", "{out}");
    assert_eq!(
        line("inos"),
        "3",
        "inode numbers unique across providers: {out}"
    );
    assert!(
        out.contains("ln: ") && out.contains("cross-device"),
        "{out}"
    );
    assert!(out.contains("rmdir: ") && out.contains("busy"), "{out}");
    // The synthesised `b`: 0755, root-owned, read-only for everyone, root included.
    assert_eq!(line("synth"), "755 root root", "{out}");
    for op in ["synthmkdir: ", "synthtouch: "] {
        let msg = out.lines().find(|l| l.starts_with(op)).unwrap_or_default();
        assert!(msg.contains("Read-only file system"), "{op}: {out}");
    }
    assert!(out.contains("mv: ") && out.contains("busy"), "{out}");
    // Host side: the inner host_fs got the guest's file, the outer's file of the mount
    // point's name is untouched, the overlay's write never reached its lower directory,
    // and nothing was created for the synthesised `b` or by the refused operations.
    assert_eq!(
        std::fs::read_to_string(inner.join("new.txt")).expect("new.txt"),
        "new-inner\n"
    );
    assert_eq!(
        std::fs::read_to_string(outer.join("sub")).expect("outer sub"),
        "outer file named sub"
    );
    assert_eq!(
        std::fs::read_to_string(deep.join("deep.txt")).expect("lower"),
        "deep-lower"
    );
    assert!(!outer.join("a/b").exists());
    assert!(!outer.join("linked").exists());
    assert!(!outer.join("a2").exists());
    assert!(outer.join("a/keep").exists());
}

/// A volume whose read-write owner was SIGKILLed mid-write (its ext4 journal needs
/// recovery) can still be attached read-only and read: the guest mounts read-only disks
/// with `noload`, so the journal is neither replayed nor required, and the image is not
/// changed by the read-only run.
#[test]
fn read_only_attach_after_the_read_write_owner_crashed() {
    let e = env();
    let vol = "crashvol";
    ok(&e.run(&["volume", "create", vol, "--size", "32"]));
    let image = e
        .home
        .path()
        .join(".cache/matchlock/volumes")
        .join(format!("{vol}.ext4"));
    let rw = e.detached(&["--no-network", "--disk", &format!("@{vol}:/data")]);
    let _g = e.guard(&rw);
    // A committed file, then a writer appending and creating files until the VM dies.
    let out = ok(&e.run(&[
        "exec",
        &rw,
        "--",
        "sh",
        "-c",
        "echo committed > /data/committed && sync && sync && \
         (i=0; while :; do echo line$i >> /data/log; : > /data/f$((i % 50)); \
         i=$((i+1)); done) </dev/null >/dev/null 2>&1 & \
         sleep 2; test -s /data/log && echo writing",
    ]));
    assert_eq!(out.trim(), "writing", "{out}");
    let pid = i32::try_from(e.owner_pid(&rw)).expect("pid");
    let vm_dir = e.state_dir().join("vms").join(&rw);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the owner");
    // PDEATHSIG takes QEMU down with its owner, mid-write.
    matchlock_test_support::wait_until(
        std::time::Duration::from_secs(30),
        "owner and QEMU gone",
        || {
            !Path::new(&format!("/proc/{pid}")).exists()
                && common::pids_matching(&vm_dir.to_string_lossy()).is_empty()
        },
    )
    .expect("owner exit");
    ok(&e.run(&["gc", &rw]));
    ok(&e.run(&["rm", &rw]));
    let before = std::fs::read(&image).expect("image");
    let out = ok(&e.sandbox(&[
        "--no-network",
        "--disk",
        &format!("@{vol}:/data:ro"),
        "--",
        "sh",
        "-c",
        "cat /data/committed; ls -a /data >/dev/null && echo listed; \
         touch /data/new 2>&1 | grep -q 'Read-only' && echo read-only",
    ]));
    // What was synced is there; what was only in the journal may not be (`noload` does
    // not replay it), so the writer's files are not checked, only that the tree lists.
    assert_eq!(out, "committed\nlisted\nread-only\n");
    assert!(
        std::fs::read(&image).expect("image") == before,
        "the read-only attach changed the image (journal replayed?)"
    );
    ok(&e.run(&["volume", "rm", vol]));
}

/// The same nesting through the RPC `vfs` config, from the published Python SDK 0.2.17
/// unchanged (`tests/python/sdk_mounts.py`): `/workspace` host_fs, `/workspace/cache`
/// memory inside it, `/workspace/cache/deep/ro` read-only host_fs inside that (the
/// memory mount gets a synthesised `deep`); the SDK's file calls go through the same tree.
#[test]
fn python_sdk_nested_vfs_config() {
    let e = env();
    let host = tempfile::tempdir().expect("tmp");
    std::fs::write(host.path().join("host.txt"), "from-host").expect("seed");
    let mut c = e.python_sdk("sdk_mounts.py");
    c.env("HOST_DIR", host.path());
    let out = c.output().expect("run the SDK scenario");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["guest"]["code"], 0, "{v}");
    assert_eq!(
        v["guest"]["out"], "in-memory\ndeep m.txt \nfrom-host1\n",
        "{v}"
    );
    assert_eq!(v["read_back"], "sdk-in-memory", "{v}");
    let listed: Vec<&str> = v["listed"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, ["cache", "host.txt", "outer.txt"], "{v}");
    // The memory mount's files never reach the host; the outer's do; the read-only mount
    // of the same directory refused the write.
    assert_eq!(
        std::fs::read_to_string(host.path().join("outer.txt")).expect("outer.txt"),
        "sdk-outer"
    );
    assert!(!host.path().join("cache").exists());
    assert!(!host.path().join("m.txt").exists());
    assert!(!host.path().join("x").exists());
}
