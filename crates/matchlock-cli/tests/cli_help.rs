//! Version and help output (reference §13.1 "Version/help"); no VM needed.

mod common;

use common::{ok, stderr, stdout};

fn bare() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_matchlock"))
}

#[test]
fn version_subcommand() {
    let out = ok(&bare().arg("version").output().expect("run"));
    assert!(out.starts_with("matchlock "), "{out}");
    assert!(out.contains("commit:"), "{out}");
}

#[test]
fn version_flag() {
    let out = ok(&bare().arg("--version").output().expect("run"));
    assert!(out.contains("matchlock"), "{out}");
}

#[test]
fn help_lists_commands() {
    let out = ok(&bare().arg("--help").output().expect("run"));
    for c in [
        "run",
        "exec",
        "log",
        "build",
        "pull",
        "list",
        "get",
        "kill",
        "rm",
        "prune",
        "port-forward",
        "rpc",
        "version",
        "image",
        "diagnose",
        "gc",
        "inspect",
    ] {
        assert!(out.contains(c), "help lacks {c}:\n{out}");
    }
}

#[test]
fn run_help_lists_flags() {
    let out = ok(&bare().args(["run", "--help"]).output().expect("run"));
    for f in [
        "--image",
        "--cpus",
        "--memory",
        "--timeout",
        "--disk-size",
        "--detach",
        "--allow-host",
        "--add-host",
        "--secret",
        "--publish",
        "--address",
        "--rm",
        "--dns-servers",
        "--mtu",
        "--no-network",
        "--hostname",
        "--entrypoint",
        "--graceful-shutdown",
        "--privileged",
    ] {
        assert!(out.contains(f), "run --help lacks {f}");
    }
}

#[test]
fn argument_errors() {
    let home = tempfile::tempdir().expect("tmp");
    let run = |args: &[&str]| {
        bare()
            .env("HOME", home.path())
            .env("XDG_CACHE_HOME", home.path())
            .args(args)
            .output()
            .expect("run")
    };
    let o = run(&["run", "echo", "hello"]);
    assert!(!o.status.success(), "run without --image must fail");
    for args in [
        &["run", "--image", "x", "-d", "-it", "sh"][..],
        &["run", "--image", "x", "-dit", "sh"],
        &[
            "run", "--image", "x", "-d", "-i", "--", "sh", "-c", "echo hi",
        ],
    ] {
        let o = run(args);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("--detach cannot be combined"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = run(&["kill"]);
    assert!(
        !o.status.success() && stderr(&o).contains("VM ID required"),
        "{}",
        stderr(&o)
    );
    let o = run(&["rm"]);
    assert!(
        !o.status.success() && stderr(&o).contains("VM ID required"),
        "{}",
        stderr(&o)
    );
    assert!(!run(&["exec"]).status.success());
    let o = run(&["exec", "vm-nonexistent", "echo", "hi"]);
    assert!(
        !o.status.success() && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let o = run(&["get", "vm-nonexistent"]);
    assert!(!o.status.success() && stderr(&o).contains("not found"));
    let o = run(&["run", "--image", "nope:latest", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("building rootfs") && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "x", "--cpus", "0", "true"]);
    assert!(
        stderr(&o).contains("--cpus must be a finite number > 0"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "x", "--cpus", "999", "true"]);
    assert!(
        stderr(&o).contains("--cpus must be <= host cpus"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "x", "--mtu", "0", "true"]);
    assert!(stderr(&o).contains("--mtu must be > 0"), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        "x",
        "--no-network",
        "--allow-host",
        "a.com",
        "true",
    ]);
    assert!(
        stderr(&o).contains("--no-network cannot be combined with --allow-host"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "x", "--allow-host", "a.com", "true"]);
    assert!(stderr(&o).contains("not supported yet"), "{}", stderr(&o));
    let o = run(&["image", "rm", "nonexistent:tag"]);
    assert!(!o.status.success());
    assert!(!run(&["image", "rm"]).status.success());
    let o = ok(&run(&["image", "ls"]));
    assert!(o.contains("TAG") && o.contains("SOURCE"));
    assert!(ok(&run(&["image", "gc"])).contains("Removed"));
    assert!(ok(&run(&["ls"])).contains("ID"));
    assert!(ok(&run(&["prune"])).contains("Pruned"));
    ok(&run(&["kill", "--all"]));
    ok(&run(&["rm", "--stopped"]));
    let _ = stdout;
}

#[test]
fn port_forward_and_allow_list_argument_errors() {
    let home = tempfile::tempdir().expect("tmp");
    let run = |args: &[&str]| {
        bare()
            .env("HOME", home.path())
            .env("XDG_CACHE_HOME", home.path())
            .args(args)
            .output()
            .expect("run")
    };
    for (args, msg) in [
        (
            &["port-forward", "vm-x", "0"][..],
            "invalid port 0: must be in range 1-65535",
        ),
        (
            &["port-forward", "vm-x", "1:2:3"],
            "invalid port-forward spec format",
        ),
        (
            &["port-forward", "--address", "example.com", "vm-x", "80"],
            "invalid bind address \"example.com\" (use an IP literal or localhost)",
        ),
        (&["port-forward", "vm-nonexistent", "80"], "not found"),
        (
            &["allow-list", "add", "vm-x", " , "],
            "expected one or more hosts",
        ),
        (
            &["allow-list", "delete", "vm-nonexistent", "a.com"],
            "not found",
        ),
        (&["volume", "ls"], "not available"),
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
}
