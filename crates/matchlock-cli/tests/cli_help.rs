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
    // Volume specs are checked before any image is looked up.
    let o = run(&["run", "--image", "x", "-v", "/tmp:/w", "true"]);
    assert!(
        stderr(&o).contains("--workspace is required when using --volume"),
        "{}",
        stderr(&o)
    );
    // Network settings are checked before any image is looked up.
    let o = run(&["run", "--image", "x", "--mtu", "100", "true"]);
    assert!(
        stderr(&o).contains("invalid network mtu 100: must be between 576 and 9000"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--image", "x", "--secret", "TOKEN=abc", "true"]);
    assert!(
        stderr(&o).contains("invalid secret \"TOKEN=abc\": missing @hosts"),
        "{}",
        stderr(&o)
    );
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
        (&["volume", "rm", "nope"], "named volume not found: nope"),
        (
            &["volume", "cp", "a", " a "],
            "source and destination must be different",
        ),
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
}

/// The names and one-line summaries of the `Commands:` section of a `--help` text.
fn command_summaries(help: &str) -> Vec<(String, String)> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let l = l.trim();
            let (name, summary) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_string(), summary.trim().to_string())
        })
        .collect()
}

#[test]
fn every_command_has_a_summary() {
    let top = ok(&bare().arg("--help").output().expect("run"));
    let cmds = command_summaries(&top);
    for c in ["prune", "version", "get", "inspect", "completion", "volume"] {
        assert!(cmds.iter().any(|(n, _)| n == c), "{c} missing:\n{top}");
    }
    for group in ["image", "volume", "allow-list"] {
        let help = ok(&bare().args([group, "--help"]).output().expect("run"));
        let subs = command_summaries(&help);
        assert!(subs.len() >= 3, "{group} --help lists no commands:\n{help}");
        for (name, summary) in subs {
            assert!(
                !summary.is_empty(),
                "`{group} {name}` has no summary:\n{help}"
            );
        }
    }
    for (name, summary) in &cmds {
        assert!(!summary.is_empty(), "`{name}` has no summary:\n{top}");
        assert!(
            !summary.starts_with("A sandbox ID"),
            "`{name}` is summarised by its argument's doc: {summary}"
        );
    }
}

#[test]
fn long_help_keeps_examples() {
    // Per-variant summaries must not replace the commands' own long help.
    for c in ["run", "exec", "port-forward", "rpc", "completion", "man"] {
        let help = ok(&bare().args([c, "--help"]).output().expect("run"));
        assert!(
            help.contains("Example"),
            "{c} --help lost its examples:\n{help}"
        );
    }
}

#[test]
fn usage_errors_exit_1() {
    let home = tempfile::tempdir().expect("tmp");
    for args in [
        &["run", "--", "true"][..],
        &["no-such-command"],
        &["list", "--no-such-flag"],
        &["image", "no-such-subcommand"],
        &["completion", "no-such-shell"],
        &["get"],
    ] {
        let o = bare()
            .env("HOME", home.path())
            .args(args)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("error:"), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
    let o = bare().args(["run", "--", "true"]).output().expect("run");
    assert!(stderr(&o).contains("--image"), "{}", stderr(&o));
}

#[test]
fn group_commands_without_subcommand_print_help() {
    for (group, subs) in [
        ("image", &["ls", "rm", "import", "gc"][..]),
        ("volume", &["create", "ls", "rm", "cp"]),
        ("allow-list", &["add", "delete"]),
    ] {
        let o = bare().arg(group).output().expect("run");
        assert_eq!(o.status.code(), Some(0), "{group}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.contains(&format!("Usage: matchlock {group} <COMMAND>")),
            "{group}: {out}"
        );
        for s in subs {
            assert!(
                command_summaries(&out).iter().any(|(n, _)| n == s),
                "{group} help lacks {s}: {out}"
            );
        }
    }
    let o = bare().output().expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Usage: matchlock <COMMAND>"));
    for args in [
        &["--help"][..],
        &["-h"],
        &["--version"],
        &["image", "--help"],
    ] {
        let o = bare().args(args).output().expect("run");
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&o).is_empty(), "{args:?}");
    }
}
