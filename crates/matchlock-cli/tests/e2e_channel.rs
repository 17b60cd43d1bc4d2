//! The virtio-serial host channel (`MATCHLOCK_DEV_CHANNEL=serial`) end to end: the key
//! paths over the multiplexed port, so CI covers it while vsock is the default.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::rpc::{b64, unb64, Rpc};
use common::{env, ok, stderr, stdout};
use serde_json::json;

const SERIAL: (&str, &str) = ("MATCHLOCK_DEV_CHANNEL", "serial");

/// `matchlock <args>` with the serial channel selected.
fn serial(args: &[&str]) -> Command {
    let mut c = env().cmd();
    c.env(SERIAL.0, SERIAL.1).args(args);
    c
}

fn run(args: &[&str]) -> std::process::Output {
    serial(args).output().expect("spawn matchlock")
}

/// Whether a `vhost-device-vsock` serves this sandbox (its command line names the VM dir).
fn helper_running_for(id: &str) -> bool {
    let dir = env().state_dir().join("vms").join(id);
    let needle = dir.join("vhost-vsock.sock");
    common::pids_matching(&needle.to_string_lossy())
        .into_iter()
        .next()
        .is_some()
}

#[test]
fn exec_stdio_flood_isolation_forward_and_port_exclusivity() {
    let out = run(&["run", "--image", common::IMAGE, "-d"]);
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let _guard = env().guard(&id);
    let vm_dir = env().state_dir().join("vms").join(&id);
    assert!(
        vm_dir.join("chan.sock").exists(),
        "no channel socket in {}",
        vm_dir.display()
    );
    assert!(
        !helper_running_for(&id),
        "vhost-device-vsock runs with the serial channel"
    );

    // stdin, stdout, stderr and the exit code.
    let mut child = serial(&[
        "exec",
        "-i",
        &id,
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo oops >&2; exit 7",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("exec");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello serial\n")
        .expect("write stdin");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o), "HELLO SERIAL\n");
    assert!(stderr(&o).contains("oops"), "{}", stderr(&o));

    // A 64 MiB stdout flood whose reader stalls: a second exec stays responsive
    // (per-stream credit), then the flood drains completely.
    let mut flood = serial(&["exec", &id, "--", "sh", "-c", "head -c 67108864 /dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flood");
    std::thread::sleep(Duration::from_secs(2)); // the flood fills every buffer and stalls
    for i in 0..3 {
        let t = Instant::now();
        let o = run(&["exec", &id, "--", "echo", &format!("alive{i}")]);
        assert_eq!(ok(&o).trim(), format!("alive{i}"));
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "exec took {:?} while another stream was stalled",
            t.elapsed()
        );
    }
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut so = flood.stdout.take().expect("stdout");
    loop {
        match so.read(&mut buf).expect("read flood") {
            0 => break,
            k => n += k,
        }
    }
    assert!(flood.wait().expect("wait").success());
    assert_eq!(n, 64 << 20, "flood bytes");

    // A port forward (CLI, through the exec relay).
    let mut server = serial(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "while true; do nc -l -p 7000 -e rev; done",
    ])
    .stdout(Stdio::null())
    .spawn()
    .expect("server");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    let mut pf = serial(&["port-forward", &id, &format!("{port}:7000")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("port-forward");
    let mut line = String::new();
    BufReader::new(pf.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.contains("Forwarding"), "{line}");
    assert_eq!(common::forward_roundtrip(port, "abc\n"), "cba\n");
    let _ = pf.kill();
    let _ = pf.wait();

    // The port's node is gone for user commands (the privileged case is below).
    let o = run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "ls /dev/vport* /dev/virtio-ports 2>/dev/null; cat /sys/class/virtio-ports/*/name",
    ]);
    assert_eq!(stdout(&o), "matchlock.0\n", "{}", stderr(&o));
    let _ = server.kill();
    let _ = server.wait();
    env().kill_and_rm(&id);
}

#[test]
fn privileged_root_cannot_open_the_port() {
    let o = run(&[
        "run",
        "--image",
        common::IMAGE,
        "--privileged",
        "--",
        "sh",
        "-c",
        "ls /dev/vport* 2>/dev/null && echo NODE-PRESENT; d=$(cat /sys/class/virtio-ports/vport*/dev); \
         mknod /tmp/p c ${d%:*} ${d#*:} || echo MKNOD-FAILED; \
         if echo hi > /tmp/p; then echo OPENED; else echo REFUSED; fi; \
         if (exec 3<>/tmp/p); then echo OPENED-RW; else echo REFUSED-RW; fi",
    ]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{text}");
    assert!(!text.contains("NODE-PRESENT"), "{text}");
    assert!(
        !text.contains("MKNOD-FAILED"),
        "privileged root can mknod: {text}"
    );
    assert!(!text.contains("OPENED"), "{text}");
    assert!(
        text.contains("REFUSED") && text.contains("REFUSED-RW"),
        "{text}"
    );
    assert!(text.contains("busy"), "expected EBUSY: {text}");
}

#[test]
fn rpc_files_exec_and_stalled_stream() {
    let mut cmd = env().cmd();
    cmd.env(SERIAL.0, SERIAL.1).arg("rpc");
    let mut r = Rpc::spawn(cmd);
    let id = r.create();
    let vm_dir = env().state_dir().join("vms").join(&id);
    assert!(vm_dir.join("chan.sock").exists());

    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    r.call(
        "write_file",
        json!({"path": "/tmp/big", "content": b64(&big)}),
        2,
    );
    let v = r.call("read_file", json!({"path": "/tmp/big"}), 3);
    let back = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        v["content"].as_str().expect("content"),
    )
    .expect("base64");
    assert!(
        back == big,
        "read_file returned other bytes ({} bytes)",
        back.len()
    );
    let v = r.call(
        "exec",
        json!({"command": "md5sum /tmp/big | cut -c1-8; exit 3"}),
        4,
    );
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(unb64(&v["stdout"]).trim().len(), 8, "{v}");

    // A 32 MiB stdout whose host reader (the CLI's stdout, through the exec relay) stalls:
    // per-stream credit stops the guest's writer after a bounded amount (without flow
    // control the bytes would pile up in the host and the command would finish), while
    // RPC requests on the same sandbox keep working, also with an exec_stream in flight.
    r.request("exec_stream", json!({"command": "sleep 600"}), json!(5));
    let flood = "dd if=/dev/zero bs=65536 count=512 2>/dev/null; touch /tmp/flood-done";
    let mut stuck = serial(&["exec", &id, "--", "sh", "-c", flood])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("stalled exec");
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..3u64 {
        let t = Instant::now();
        let v = r.call("exec", json!({"command": format!("echo ping{i}")}), 10 + i);
        assert_eq!(unb64(&v["stdout"]).trim(), format!("ping{i}"));
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
    let probe = "test -e /tmp/flood-done && echo DONE || echo STALLED";
    let v = r.call("exec", json!({ "command": probe }), 14);
    assert_eq!(
        unb64(&v["stdout"]).trim(),
        "STALLED",
        "the stalled stream was not held back"
    );
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut so = stuck.stdout.take().expect("stdout");
    loop {
        match so.read(&mut buf).expect("read flood") {
            0 => break,
            k => n += k,
        }
    }
    assert!(stuck.wait().expect("wait").success());
    assert_eq!(n, 32 << 20);
    let v = r.call("exec", json!({ "command": probe }), 15);
    assert_eq!(unb64(&v["stdout"]).trim(), "DONE");
    r.call("cancel", json!({"id": 5}), 20);
    r.response(&json!(5));
    r.call("close", json!({}), 21);
    assert!(r.finish().success());
}
