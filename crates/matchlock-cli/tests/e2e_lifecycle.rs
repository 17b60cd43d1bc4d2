//! Sandboxes that outlive a command: detach, exec, list/get/inspect, kill, rm, log, gc after
//! an owner crash, TTY sessions and Ctrl-C.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{env, ok, pids_matching, stderr, stdout};
use matchlock_test_support::wait_until;

#[test]
fn detached_sandbox_lifecycle() {
    let e = env();
    let id = e.detached(&[
        "-e",
        "VISIBLE_ENV=from-run",
        "--",
        "sh",
        "-c",
        "echo started > /tmp/detach-marker; sleep 300",
    ]);
    let _cleanup = e.guard(&id);
    // exec works right away: run -d returns only once the sandbox is ready.
    let out = ok(&e.run(&["exec", &id, "--", "sh", "-c", "echo $VISIBLE_ENV"]));
    assert_eq!(out.trim(), "from-run");
    // The detached command runs in the sandbox (it starts right after readiness).
    wait_until(Duration::from_secs(30), "detached command ran", || {
        let probe = "test -f /tmp/detach-marker && echo ok";
        stdout(&e.run(&["exec", &id, "--", "sh", "-c", probe])).trim() == "ok"
    })
    .expect("marker");
    let out = ok(&e.run(&["exec", &id, "--", "sh", "-c", "echo one && echo two"]));
    assert!(out.contains("one") && out.contains("two"));
    assert_eq!(
        e.run(&["exec", &id, "--", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );
    let out = ok(&e.run(&[
        "exec",
        "-u",
        "app",
        "-w",
        "/home/app",
        &id,
        "--",
        "sh",
        "-c",
        "id -un; pwd",
    ]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["app", "/home/app"]
    );
    let out = e.run_stdin(&["exec", "-i", &id, "--", "cat"], b"via relay\n");
    assert_eq!(ok(&out), "via relay\n");
    let o = e.run(&["exec", &id]);
    assert!(stderr(&o).contains("command required"), "{}", stderr(&o));

    let list = ok(&e.run(&["list"]));
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("row in list");
    assert!(
        row.contains("running") && row.contains(common::IMAGE),
        "{row}"
    );
    assert!(ok(&e.run(&["ls", "--running"])).contains(&id));

    let get: serde_json::Value =
        serde_json::from_str(&ok(&e.run(&["get", &id]))).expect("get json");
    assert_eq!(get["id"], id.as_str());
    assert_eq!(get["status"], "running");
    assert_eq!(get["config"]["env"]["VISIBLE_ENV"], "from-run");
    for cmd in ["inspect", "stat"] {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&e.run(&[cmd, &id]))).expect("inspect json");
        assert_eq!(v["vm"]["id"], id.as_str());
        assert_eq!(v["lifecycle"]["vm_id"], id.as_str());
        assert_eq!(v["lifecycle"]["phase"], "running");
        assert!(v["history"].as_array().is_some_and(|h| h.len() >= 3), "{v}");
    }
    // rm refuses a running sandbox.
    let o = e.run(&["rm", &id]);
    assert!(!o.status.success(), "rm of a running VM must fail");

    // `kill` returns once the sandbox has stopped (issue 8 item 23): no polling needed.
    assert!(ok(&e.run(&["kill", &id])).contains("Killed"));
    assert!(!stdout(&e.run(&["list", "--running"])).contains(&id));
    let list = ok(&e.run(&["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("stopped")),
        "{list}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&e.run(&["inspect", &id]))).expect("json");
    assert_eq!(v["lifecycle"]["phase"], "cleaned", "{v}");
    let o = e.run(&["exec", &id, "true"]);
    assert!(stderr(&o).contains("is not running"), "{}", stderr(&o));
    assert!(ok(&e.run(&["rm", &id])).contains("Removed"));
    assert!(!ok(&e.run(&["list"])).contains(&id));
    assert!(!e.state_dir().join("vms").join(&id).exists());
}

#[test]
fn log_and_follow() {
    let e = env();
    let id = e.detached(&[
        "--",
        "sh",
        "-c",
        "echo first && sleep 2 && echo second && sleep 300",
    ]);
    let _cleanup = e.guard(&id);
    wait_until(Duration::from_secs(30), "first in log", || {
        stdout(&e.run(&["log", &id])).contains("first")
    })
    .expect("first");
    let mut follower = e
        .cmd()
        .args(["log", "-f", &id])
        .stdout(Stdio::piped())
        .spawn()
        .expect("log -f");
    let mut out = follower.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
            if s.contains("second") {
                break;
            }
        }
        s
    });
    wait_until(Duration::from_secs(30), "second streamed", || {
        reader.is_finished()
    })
    .expect("follow");
    let seen = reader.join().expect("reader");
    assert!(seen.contains("first") && seen.contains("second"), "{seen}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let st = follower.wait().expect("wait follower");
    assert!(st.success(), "log -f must exit 0 on SIGINT: {st:?}");
    e.kill_and_rm(&id);
}

#[test]
fn owner_killed_then_gc_reclaims_everything() {
    let e = env();
    let mut owner = e
        .cmd()
        .args(["run", "--image", common::IMAGE, "--rm=false", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn owner");
    let pid = owner.id();
    let mut id = String::new();
    wait_until(
        Duration::from_secs(120),
        "sandbox registered and ready",
        || {
            let list = stdout(&e.run(&["list", "--running"]));
            if let Some(row) = list
                .lines()
                .find(|l| l.split_whitespace().last() == Some(&pid.to_string()))
            {
                id = row
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                return e
                    .state_dir()
                    .join("vms")
                    .join(&id)
                    .join("exec.sock")
                    .exists();
            }
            false
        },
    )
    .expect("ready");
    let vm_dir = e.state_dir().join("vms").join(&id);
    assert!(
        !pids_matching(&vm_dir.to_string_lossy()).is_empty(),
        "QEMU/helpers should reference the VM dir"
    );
    owner.kill().expect("SIGKILL owner");
    owner.wait().expect("reap owner");
    // PDEATHSIG takes the VM down with its owner: no orphan QEMU or vsock helper.
    wait_until(Duration::from_secs(20), "no orphans", || {
        pids_matching(&vm_dir.to_string_lossy()).is_empty()
    })
    .expect("orphans remain");
    let list = ok(&e.run(&["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("crashed")),
        "{list}"
    );
    let gc = ok(&e.run(&["gc", &id]));
    assert!(gc.contains(&format!("{id}: cleaned")), "{gc}");
    assert!(
        !vm_dir.join("upper.ext4").exists(),
        "upper disk must be reclaimed"
    );
    let gc = ok(&e.run(&["gc", &id]));
    assert!(gc.contains("no resources to clean"), "{gc}");
    assert!(ok(&e.run(&["rm", &id])).contains("Removed"));
    let mut err = String::new();
    let _ = owner.stderr.take().map(|mut s| s.read_to_string(&mut err));
}

/// Runs `matchlock` under a real PTY (script(1) allocates it) and types into it.
#[test]
fn interactive_tty_session() {
    let e = env();
    let bin = env!("CARGO_BIN_EXE_matchlock");
    let inner = format!("{bin} run --image {} -it sh", common::IMAGE);
    let mut cmd: Command = e.cmd();
    let mut child = Command::new("script")
        .args(["-qefc", &inner, "/dev/null"])
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    let _ = &mut cmd;
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    // Wait for the shell prompt before typing (the VM boots first).
    std::thread::sleep(Duration::from_millis(200));
    let typed = "tty; stty size; echo TTY_OK_$((40+2)); exit 3\n";
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Typing early is fine: the PTY buffers input until the guest shell reads it.
    stdin.write_all(typed.as_bytes()).expect("type");
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "interactive session did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().expect("reader");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("TTY_OK_42"), "{text}");
    assert_eq!(status.code(), Some(3), "{text}");
}

#[test]
fn ctrl_c_kills_guest_command_and_cleans_up() {
    let e = env();
    let mut child = e
        .cmd()
        .args([
            "run",
            "--image",
            common::IMAGE,
            "--",
            "sh",
            "-c",
            "echo READY; sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 64];
    let mut seen = String::new();
    while !seen.contains("READY") {
        let n = out.read(&mut buf).expect("read");
        assert!(n > 0, "run exited before READY");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(130));
    let list = ok(&e.run(&["list"]));
    assert!(
        !list
            .lines()
            .any(|l| l.contains(&format!(" {}", child.id()))),
        "{list}"
    );
}

#[test]
fn detached_without_command_stays_up() {
    let e = env();
    let id = e.detached(&[]);
    let _cleanup = e.guard(&id);
    assert!(ok(&e.run(&["exec", &id, "echo", "alive"])).contains("alive"));
    // Writes persist across execs in the same sandbox (one writable root per VM).
    ok(&e.run(&["exec", &id, "--", "sh", "-c", "echo kept > /root/state"]));
    assert_eq!(
        ok(&e.run(&["exec", &id, "cat", "/root/state"])).trim(),
        "kept"
    );
    e.kill_and_rm(&id);
}
