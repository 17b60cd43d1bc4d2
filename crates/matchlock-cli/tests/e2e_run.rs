//! `matchlock run` end to end: each test boots a real VM (TCG here) from the busybox image.

mod common;

use std::time::{Duration, Instant};

use common::{env, ok, stderr, stdout};

#[test]
fn echo_hello_and_os_release() {
    let out = ok(&env().sandbox(&["echo", "hello"]));
    assert_eq!(out.trim(), "hello");
    let out = ok(&env().sandbox(&["--", "sh", "-c", "echo foo bar; cat /etc/os-release"]));
    assert!(out.contains("foo bar"), "{out}");
    assert!(out.contains("Matchlock Busybox"), "{out}");
}

#[test]
fn exit_codes_propagate() {
    let e = env();
    assert_eq!(e.sandbox(&["false"]).status.code(), Some(1));
    assert_eq!(
        e.sandbox(&["--", "sh", "-c", "exit 42"]).status.code(),
        Some(42)
    );
    assert_eq!(
        e.sandbox(&["--", "sh", "-c", "kill -9 $$"]).status.code(),
        Some(137)
    );
    let o = e.sandbox(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    let o = e.sandbox(&["/etc/passwd"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
}

#[test]
fn no_command_runs_image_cmd_with_stdin_at_eof() {
    // Image CMD is /bin/sh; with stdin at EOF it exits 0.
    ok(&env().sandbox(&[]));
}

#[test]
fn env_sources_and_precedence() {
    let e = env();
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("e.env");
    std::fs::write(
        &f,
        "# sample env file\nFILE_ONLY=from-file\nMATCHLOCK_ENV_FILE_HOST\nSAME=file\n",
    )
    .expect("write");
    let out = ok(&e
        .cmd()
        .env("MATCHLOCK_ENV_FILE_HOST", "from-host")
        .env("MATCHLOCK_HOST_ENV_TEST", "host-flag")
        .args(["run", "--image", common::IMAGE, "--env-file"])
        .arg(&f)
        .args(["-e", "FOO=bar", "-e", "SAME=flag", "-e", "MATCHLOCK_HOST_ENV_TEST", "--", "sh", "-c"])
        .arg(r#"printf "%s|%s|%s|%s|%s" "$FOO" "$FILE_ONLY" "$MATCHLOCK_ENV_FILE_HOST" "$SAME" "$MATCHLOCK_HOST_ENV_TEST""#)
        .output()
        .expect("run"));
    assert_eq!(out, "bar|from-file|from-host|flag|host-flag");
    let o = e.sandbox(&["-e", "MATCHLOCK_ENV_MISSING_ABC123", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("invalid environment variable")
            && stderr(&o).contains("MATCHLOCK_ENV_MISSING_ABC123"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn users_and_workdir() {
    let e = env();
    let script = "id -u; id -g; echo $HOME; pwd";
    let out = ok(&e.sandbox(&["--", "sh", "-c", script]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "0", "/root", "/"]
    );
    let out = ok(&e.sandbox(&[
        "-u",
        "app",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "id -u; id -g; echo $HOME; pwd; id -G",
    ]));
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&words[..4], ["1000", "1000", "/home/app", "/tmp"], "{out}");
    assert!(
        words[4..].contains(&"50"),
        "supplementary group staff missing: {out}"
    );
    let out = ok(&e.sandbox(&["-u", "65534:65534", "--", "sh", "-c", "id -u; id -g"]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["65534", "65534"]
    );
    let out = ok(&e.sandbox(&["-u", "nobody", "--", "id", "-u"]));
    assert_eq!(out.trim(), "65534");
    let o = e.sandbox(&["-u", "ghost", "true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ghost"), "{}", stderr(&o));
}

#[test]
fn hostname_hosts_and_resolv_conf() {
    let e = env();
    // The default hostname is the sandbox id; the image's own /etc/hostname says
    // "matchlock".
    let id = e.detached(&[]);
    let _guard = e.guard(&id);
    let out = ok(&e.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf",
    ]));
    e.kill_and_rm(&id);
    // `hostname`, then /etc/hostname.
    assert_eq!(
        out.lines().take(2).collect::<Vec<_>>(),
        [id.as_str(), id.as_str()],
        "{out}"
    );
    assert!(
        out.contains(&format!("localhost localhost.localdomain {id}\n")),
        "{out}"
    );
    // The owner answers DNS at the gateway (nothing is sent to public resolvers unasked).
    assert!(out.contains("nameserver 10.0.2.2"), "{out}");
    assert!(!out.contains("8.8.8.8"), "{out}");
    let out = ok(&e.sandbox(&[
        "--hostname",
        "override.internal",
        "--add-host",
        "api.internal:10.0.0.10",
        "--add-host",
        "db.internal:10.0.0.11",
        "--dns-servers",
        "1.1.1.1,1.0.0.1",
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf",
    ]));
    assert_eq!(
        out.lines().take(2).collect::<Vec<_>>(),
        ["override.internal", "override.internal"],
        "{out}"
    );
    assert!(
        out.contains("localhost localhost.localdomain override.internal"),
        "{out}"
    );
    assert!(
        out.contains("10.0.0.10 api.internal") && out.contains("10.0.0.11 db.internal"),
        "{out}"
    );
    assert!(
        out.contains("nameserver 1.1.1.1") && out.contains("nameserver 1.0.0.1"),
        "{out}"
    );
    let o = e.sandbox(&["--add-host", "invalid-spec", "true"]);
    assert!(
        stderr(&o).contains("invalid add-host mapping"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stdin_pipe_and_large_output() {
    let e = env();
    let out = e.run_stdin(
        &["run", "--image", common::IMAGE, "-i", "--", "cat"],
        b"piped through cat\n",
    );
    assert_eq!(ok(&out), "piped through cat\n");
    let out = ok(&e.sandbox(&["--", "sh", "-c", "seq 1 200000; seq 1 1000 >&2"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 200000);
    assert_eq!(lines.first(), Some(&"1"));
    assert_eq!(lines.last(), Some(&"200000"));
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == (i + 1).to_string()),
        "output corrupted"
    );
}

#[test]
fn resources_and_rootfs_semantics() {
    // Writable root (overlay), image data intact, CPU count, memory, disk size.
    let out = ok(&env().sandbox(&[
        "--cpus", "1", "--memory", "256", "--disk-size", "512", "--", "sh", "-c",
        "echo data > /root/f && cat /root/f; nproc; grep MemTotal /proc/meminfo; df -m / | tail -n1",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "data");
    assert_eq!(lines[1], "1");
    let mem_kb: u64 = lines[2]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("memtotal");
    assert!(mem_kb > 150_000 && mem_kb <= 262_144, "{out}");
    assert!(lines[3].contains("overlay"), "{out}");
}

#[test]
fn timeout_kills_command() {
    let t = Instant::now();
    let o = env().sandbox(&["--timeout", "3", "--", "sleep", "600"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn rm_cleans_up_state() {
    let e = env();
    // The default hostname is the sandbox id.
    let id = ok(&e.sandbox(&["hostname"])).trim().to_string();
    assert!(id.starts_with("vm-"), "{id}");
    assert!(
        !ok(&e.run(&["list"])).contains(&id),
        "--rm must remove the sandbox row"
    );
    assert!(
        !e.state_dir().join("vms").join(&id).exists(),
        "--rm must remove the state dir"
    );
    let _ = stdout;
}

#[test]
fn missing_kernel_is_explained() {
    let o = env()
        .cmd()
        .env("MATCHLOCK_KERNEL", "/nonexistent/vmlinux")
        .args(["run", "--image", common::IMAGE, "true"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("guest kernel not found at /nonexistent/vmlinux"),
        "{err}"
    );
    assert!(err.contains("scripts/build-kernel.sh"), "{err}");
}

/// Runs a sandbox whose guest never answers the boot handshake (busybox as /init: a valid
/// static binary that never speaks our protocol), with the given extra `run` flags.
fn never_ready(e: &common::TestEnv, hostname: &str, extra: &[&str]) -> String {
    let t = Instant::now();
    let mut args = vec!["run", "--image", common::IMAGE, "--hostname", hostname];
    args.extend_from_slice(extra);
    args.push("true");
    let o = e
        .cmd()
        .env("MATCHLOCK_GUEST_INIT", "/bin/busybox")
        .env("MATCHLOCK_BOOT_TIMEOUT", "8")
        .args(&args)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("VM failed to become ready"), "{err}");
    assert!(err.contains("last lines of the VM console"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60));
    err
}

/// The ids `list` shows whose recorded config has `hostname`.
fn listed_with_hostname(e: &common::TestEnv, hostname: &str) -> Vec<String> {
    let list = ok(&e.run(&["list"]));
    list.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| stdout(&e.run(&["get", id])).contains(&format!("\"{hostname}\"")))
        .map(str::to_string)
        .collect()
}

#[test]
fn guest_that_never_becomes_ready_fails_with_console_tail_and_leaves_nothing() {
    let e = env();
    // --rm (the default): the failed attempt leaves no record behind.
    never_ready(e, "never-ready-rm", &[]);
    assert_eq!(
        listed_with_hostname(e, "never-ready-rm"),
        Vec::<String>::new()
    );
    // --rm=false keeps the record (stopped) for inspection, and nothing else.
    never_ready(e, "never-ready-kept", &["--rm=false"]);
    let kept = listed_with_hostname(e, "never-ready-kept");
    assert_eq!(kept.len(), 1, "the failed sandbox should be listed once");
    let list = ok(&e.run(&["list"]));
    for id in &kept {
        assert!(
            list.lines()
                .any(|l| l.starts_with(id.as_str()) && !l.contains("running")),
            "{list}"
        );
        let dir = e.state_dir().join("vms").join(id);
        assert!(
            common::pids_matching(&dir.to_string_lossy()).is_empty(),
            "leftover process for {id}"
        );
        assert!(!dir.join("upper.ext4").exists(), "leftover disk for {id}");
    }
}

#[test]
fn diagnose_reports_checks() {
    let e = env();
    let o = e.run(&["diagnose", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("diagnose json");
    let checks = v["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for n in [
        "qemu",
        "accel",
        "vsock-backend",
        "kernel",
        "guest-runtime",
        "mke2fs",
        "tar2sqfs",
        "state-dir",
        "cache-dir",
    ] {
        assert!(names.contains(&n), "missing check {n}: {names:?}");
    }
    assert_eq!(v["ok"], true, "{v}");
    assert!(o.status.success());
    let text = ok(&e.run(&["diagnose"]));
    assert!(text.contains("✓ qemu") && text.contains("accel"), "{text}");
    // A missing kernel fails the check, with a fix.
    let o = e
        .cmd()
        .env("MATCHLOCK_KERNEL", "/nonexistent/vmlinux")
        .args(["diagnose"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        stdout(&o).contains("✗ kernel") && stdout(&o).contains("fix: scripts/build-kernel.sh"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("diagnose failed: one or more checks failed"));
}

#[test]
fn per_command_hardening_unless_privileged() {
    let e = env();
    let probe = "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '";
    let out = ok(&e.sandbox(&["--", "sh", "-c", probe]));
    assert!(
        out.contains("NoNewPrivs: 1") && out.contains("Seccomp: 2"),
        "{out}"
    );
    let out = ok(&e.sandbox(&["--privileged", "--", "sh", "-c", probe]));
    assert!(
        out.contains("NoNewPrivs: 0") && out.contains("Seccomp: 0"),
        "{out}"
    );
}

#[test]
fn closed_stdout_ends_quietly() {
    // `| head` closes our stdout early: no "Broken pipe" error, the guest command is stopped.
    let e = env();
    let bin = env!("CARGO_BIN_EXE_matchlock");
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(format!(
        "{bin} run --image {} -- seq 1 1000000 | head -n 2",
        common::IMAGE
    ));
    for (k, v) in e.cmd().get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    let out = sh.output().expect("sh");
    assert_eq!(stdout(&out), "1\n2\n");
    assert!(!stderr(&out).contains("Broken pipe"), "{}", stderr(&out));
}
