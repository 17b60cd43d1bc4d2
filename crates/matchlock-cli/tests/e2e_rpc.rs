//! `matchlock rpc` protocol tests: raw JSON lines against the built binary, real VMs.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use common::rpc::{b64, unb64, Rpc};
use common::{env, ok, stdout};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The VM's host resources are gone: no process mentions its id, no disk or socket is left.
fn assert_cleaned_up(id: &str) {
    let dir = env().state_dir().join("vms").join(id);
    let files = ["upper.ext4", "vsock.sock", "vhost-vsock.sock", "exec.sock"];
    // Teardown may still be finishing (e.g. after a timeout expiry).
    let _ = matchlock_test_support::wait_until(Duration::from_secs(20), "teardown", || {
        files.iter().all(|f| !dir.join(f).exists())
    });
    for f in files {
        assert!(!dir.join(f).exists(), "{f} left behind for {id}");
    }
    matchlock_test_support::wait_until(Duration::from_secs(10), "VM processes gone", || {
        common::pids_matching(id).is_empty()
    })
    .expect("no VM process left");
    let list = stdout(&env().run(&["list"]));
    let line = list.lines().find(|l| l.contains(id)).expect("listed");
    assert!(line.contains("stopped"), "{line}");
}

#[test]
fn protocol_errors_without_a_vm() {
    let mut r = Rpc::start();
    r.send_raw(b"{not json");
    let v = r.wait_for("parse error", |v| v["error"]["code"] == -32700);
    assert_eq!(v["error"]["message"], "Parse error");
    assert!(v.get("id").is_none());
    r.send_raw(b"");
    r.send_raw(br#"{"jsonrpc":"2.0","method":"bogus","id":"str-1"}"#);
    let v = r.response(&json!("str-1"));
    assert_eq!(v["error"]["code"], -32601);
    r.send_raw(br#"{"jsonrpc":"2.0","method":"exec","id":-4}"#);
    r.wait_for("invalid id", |v| v["error"]["code"] == -32600);
    // An oversized line is answered and skipped; the server keeps serving.
    let mut big = br#"{"jsonrpc":"2.0","method":"write_file","params":{"content":""#.to_vec();
    big.extend(std::iter::repeat_n(b'A', 10 << 20));
    big.extend_from_slice(br#""},"id":77}"#);
    r.send_raw(&big);
    let v = r.wait_for("line too long", |v| {
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeds"))
    });
    assert_eq!(v["error"]["code"], -32600);

    assert_eq!(r.call_err("exec", json!({"command": "true"}), 2).0, -32000);
    assert_eq!(
        r.call_err("log", Value::Null, 3),
        (-32000, "VM not created".into())
    );
    // exec_pipe / exec_tty / log_stream need an id.
    for m in ["exec_pipe", "exec_tty", "log_stream"] {
        r.send(json!({"jsonrpc":"2.0","method": m, "params": {"command": "cat"}}));
        let v = r.wait_for("id required", |v| v["error"]["code"] == -32600);
        assert!(v.get("id").is_none(), "{v}");
    }
    let cases = [
        (json!({}), -32602, "image is required"),
        (
            json!({"image": "x", "id": "vm-1"}),
            -32602,
            "id is internal-only",
        ),
        (
            json!({"image": "x", "network": {"no_network": true, "allowed_hosts": ["a"]}}),
            -32602,
            "network.no_network",
        ),
        (
            json!({"image": "x", "vfs": {"workspace": "/w", "mounts": {"/x": {}}}}),
            -32602,
            "must be within workspace",
        ),
        (
            json!({"image": "x", "network": {"allowed_hosts": ["a.com"], "mtu": 100}}),
            -32000,
            "invalid network mtu 100: must be between 576 and 9000",
        ),
        (
            // A registry reference on a closed loopback port: the pull fails at once and
            // nothing leaves the machine.
            json!({"image": "127.0.0.1:1/no-such:image"}),
            -32000,
            "failed to build rootfs",
        ),
        (
            json!({"image": common::IMAGE, "resources": {"cpus": 4096}}),
            -32000,
            "cpus",
        ),
    ];
    for (i, (params, code, text)) in cases.into_iter().enumerate() {
        let (c, m) = r.call_err("create", params, 100 + i as u64);
        assert_eq!(c, code, "{m}");
        assert!(m.contains(text), "{m} should contain {text}");
    }
    assert_eq!(
        r.call_err("write_file", json!({"path": "/a", "content": "!!"}), 4),
        (-32602, "invalid base64 content".into())
    );
    assert_eq!(
        r.call_err("allow_list_add", json!({"hosts": []}), 5),
        (-32602, "hosts is required".into())
    );
    assert_eq!(
        r.call_err("port_forward", json!({}), 6),
        (-32602, "forwards is required".into())
    );
    assert_eq!(
        r.call("cancel", json!({"id": 12345}), 7),
        json!({"cancelled": false})
    );
    // Input for unknown ids is ignored without a response.
    r.send(
        json!({"jsonrpc":"2.0","method":"exec_pipe.stdin","params":{"id": 999, "data": "aGk="}}),
    );
    assert_eq!(r.call("close", json!({}), 8), json!({}));
    assert!(r.finish().success());
}

#[test]
fn exec_modes_files_logs_relay_and_close() {
    let mut r = Rpc::start();
    let id = r.create();
    // A second create refuses instead of leaking the first VM.
    let (c, m) = r.call_err("create", json!({"image": common::IMAGE}), 2);
    assert_eq!(c, -32000);
    assert!(m.contains(&id), "{m}");

    let v = r.call(
        "exec",
        json!({"command": "echo out; echo err >&2; exit 3"}),
        3,
    );
    assert_eq!(v["exit_code"], 3);
    assert_eq!(unb64(&v["stdout"]), "out\n");
    assert_eq!(unb64(&v["stderr"]), "err\n");
    assert!(v["duration_ms"].is_u64());
    let v = r.call("exec", json!({"command": "pwd", "working_dir": "/tmp"}), 4);
    assert_eq!(unb64(&v["stdout"]), "/tmp\n");
    let v = r.call("exec", json!({"command": "id -u", "user": "65534"}), 40);
    assert_eq!(unb64(&v["stdout"]), "65534\n");

    let v = r.call("exec_stream", json!({"command": "seq 1 3; echo e >&2"}), 5);
    assert_eq!(v["exit_code"], 0);
    assert!(v.get("stdout").is_none());
    assert_eq!(r.take_data("exec_stream.stdout", 5), "1\n2\n3\n");
    assert_eq!(r.take_data("exec_stream.stderr", 5), "e\n");

    r.request(
        "exec_pipe",
        json!({"command": "tr a-z A-Z; echo done >&2"}),
        json!(6),
    );
    r.wait_for("pipe ready", |v| {
        v["method"] == "exec_pipe.ready" && v["params"]["id"] == 6
    });
    for chunk in [&b"hello "[..], b"world\n"] {
        r.send(
            json!({"jsonrpc":"2.0","method":"exec_pipe.stdin","params":{"id":6,"data":b64(chunk)}}),
        );
    }
    r.send(json!({"jsonrpc":"2.0","method":"exec_pipe.stdin_eof","params":{"id":6},"id":60}));
    let v = r.response(&json!(6));
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    assert_eq!(r.take_data("exec_pipe.stdout", 6), "HELLO WORLD\n");
    assert_eq!(r.take_data("exec_pipe.stderr", 6), "done\n");

    r.request(
        "exec_tty",
        json!({"command": "stty size; read x; stty size; tty", "rows": 30, "cols": 100}),
        json!(7),
    );
    r.wait_for("tty ready", |v| {
        v["method"] == "exec_tty.ready" && v["params"]["id"] == 7
    });
    r.wait_for("first size", |v| {
        v["method"] == "exec_tty.stdout" && unb64(&v["params"]["data"]).contains("30 100")
    });
    r.send(
        json!({"jsonrpc":"2.0","method":"exec_tty.resize","params":{"id":7,"rows":50,"cols":120}}),
    );
    std::thread::sleep(Duration::from_millis(300));
    r.send(
        json!({"jsonrpc":"2.0","method":"exec_tty.stdin","params":{"id":7,"data":b64(b"go\r")}}),
    );
    let v = r.response(&json!(7));
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let tty_out = r.take_data("exec_tty.stdout", 7);
    assert!(tty_out.contains("50 120"), "{tty_out:?}");
    assert!(tty_out.contains("/dev/pts/"), "{tty_out:?}");

    let content = b64(b"#!/bin/sh\necho script-output\n");
    r.call(
        "write_file",
        json!({"path": "/opt/app/run.sh", "content": content, "mode": 0o755}),
        8,
    );
    let v = r.call("exec", json!({"command": "/opt/app/run.sh"}), 9);
    assert_eq!(unb64(&v["stdout"]), "script-output\n");
    let v = r.call("read_file", json!({"path": "/opt/app/run.sh"}), 10);
    assert!(unb64(&v["content"]).contains("script-output"));
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    r.call(
        "write_file",
        json!({"path": "/tmp/big", "content": b64(&big)}),
        11,
    );
    let v = r.call("read_file", json!({"path": "/tmp/big"}), 12);
    let back = base64::engine::general_purpose::STANDARD
        .decode(v["content"].as_str().expect("content"))
        .expect("b64");
    assert_eq!(back, big);
    let v = r.call("list_files", json!({"path": "/opt/app"}), 13);
    let f = &v["files"][0];
    assert_eq!(f["name"], "run.sh");
    assert_eq!(f["mode"], 0o755);
    assert_eq!(f["is_dir"], false);
    assert_eq!(f["mod_time"], "0001-01-01T00:00:00Z");
    let v = r.call("list_files", json!({"path": "/opt"}), 14);
    assert_eq!(v["files"][0]["mode"], (1u64 << 31) | 0o755);
    let (c, m) = r.call_err("read_file", json!({"path": "/nope"}), 15);
    assert_eq!(c, -32002, "{m}");
    assert!(m.starts_with("guest file operation: "), "{m}");
    let (c, _) = r.call_err("allow_list_add", json!({"hosts": ["a.com"]}), 16);
    assert_eq!(c, -32000);

    // The exec relay serves CLI processes for RPC-created sandboxes too.
    let out = ok(&env().run(&["exec", &id, "--", "cat", "/opt/app/run.sh"]));
    assert!(out.contains("script-output"), "{out}");

    // log / log_stream: command output is not in the console log, but boot messages are
    // and the stream delivers existing content, then ends with -32003 when cancelled.
    let v = r.call("log", Value::Null, 17);
    let log = unb64(&v["content"]);
    r.request("log_stream", Value::Null, json!(18));
    r.wait_for("log data", |v| v["method"] == "log_stream.data");
    assert_eq!(
        r.call("cancel", json!({"id": 18}), 19),
        json!({"cancelled": true})
    );
    let v = r.response(&json!(18));
    assert_eq!(v["error"]["code"], -32003);
    assert!(!log.is_empty());

    assert_eq!(
        r.call("close", json!({"timeout_seconds": 2}), 20),
        json!({})
    );
    assert!(r.finish().success());
    assert_cleaned_up(&id);
}

#[test]
fn cancel_kills_the_command_in_every_exec_mode() {
    let mut r = Rpc::start();
    r.create();
    for (i, method) in ["exec", "exec_stream", "exec_pipe", "exec_tty"]
        .into_iter()
        .enumerate()
    {
        let id = 10 + i as u64;
        let marker = format!("/tmp/started-{method}");
        r.request(
            method,
            json!({"command": format!("touch {marker}; exec sleep 300")}),
            json!(id),
        );
        // Wait until the command is running.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = r.call("exec", json!({"command": format!("test -e {marker}")}), 900);
            if v["exit_code"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{method} never started");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            r.call("cancel", json!({"id": id}), 901),
            json!({"cancelled": true})
        );
        let v = r.response(&json!(id));
        assert_eq!(v["error"]["code"], -32003, "{method}: {v}");
        assert_eq!(v["error"]["message"], "context canceled");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = r.call(
                "exec",
                json!({"command": "ps -o comm | grep -c '^sleep' || true"}),
                902,
            );
            if unb64(&v["stdout"]).trim() == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{method}: sleep still running after cancel"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn concurrent_execs_overlap_and_eof_without_close_cleans_up() {
    let mut r = Rpc::start();
    let id = r.create();
    // Each exec marks its arrival, then waits (bounded) until all three have arrived: they
    // can only all print "ready" if they ran at the same time. No wall-clock threshold, so
    // a loaded machine cannot fail it; serialised execs would print "alone".
    for i in 1..=3u64 {
        let cmd = format!(
            "touch /tmp/overlap.{i}; n=0; while [ $n -lt 600 ]; do [ -e /tmp/overlap.1 ] && [ -e /tmp/overlap.2 ] && [ -e /tmp/overlap.3 ] && {{ echo {i} ready; exit 0; }}; sleep 0.1; n=$((n+1)); done; echo {i} alone"
        );
        r.request("exec", json!({ "command": cmd }), json!(i + 10));
    }
    for i in 1..=3u64 {
        let v = r.response(&json!(i + 10));
        assert_eq!(
            unb64(&v["result"]["stdout"]).trim(),
            format!("{i} ready"),
            "{v}"
        );
    }
    // No close: EOF alone must shut the VM down cleanly.
    assert!(r.finish().success());
    assert_cleaned_up(&id);
}

#[test]
fn timeout_seconds_is_enforced() {
    let mut r = Rpc::start();
    let v = r.call(
        "create",
        json!({"image": common::IMAGE, "resources": {"timeout_seconds": 4}}),
        1,
    );
    let id = v["id"].as_str().expect("id").to_string();
    r.request("exec", json!({"command": "sleep 120"}), json!(2));
    let v = r.response(&json!(2));
    assert_eq!(v["error"]["code"], -32003, "{v}");
    let (c, m) = r.call_err("exec", json!({"command": "true"}), 3);
    assert_eq!(c, -32000);
    assert!(m.contains("timeout_seconds"), "{m}");
    assert_cleaned_up(&id);
    assert!(r.finish().success());
}

#[test]
fn port_forward_through_rpc_and_cli() {
    let mut r = Rpc::start();
    let id = r.create();
    // A one-shot TCP service in the guest that answers after the client half-closes.
    r.request(
        "exec_stream",
        json!({"command": "while true; do nc -l -p 7000 -e rev; done"}),
        json!(2),
    );
    let v = r.call(
        "port_forward",
        json!({"forwards": [{"local_port": 0, "remote_port": 7000}]}),
        3,
    );
    let b = &v["bindings"][0];
    assert_eq!(b["address"], "127.0.0.1");
    assert_eq!(b["remote_port"], 7000);
    let port = b["local_port"].as_u64().expect("port") as u16;
    assert_eq!(common::forward_roundtrip(port, "hello\n"), "olleh\n");

    // The CLI reaches the same sandbox through its exec relay.
    let cli_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    let mut pf = env()
        .cmd()
        .args(["port-forward", &id, &format!("{cli_port}:7000")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("port-forward");
    let mut line = String::new();
    BufReader::new(pf.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(
        line.trim(),
        format!("Forwarding 127.0.0.1:{cli_port} -> sandbox:7000")
    );
    assert_eq!(common::forward_roundtrip(cli_port, "abc\n"), "cba\n");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pf.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(pf.wait().expect("wait").success());

    r.call("cancel", json!({"id": 2}), 4);
    r.response(&json!(2));
    r.call("close", json!({}), 5);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener survived close"
    );
}

#[test]
fn run_publish_forwards_ports() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    let bad = env().sandbox(&["-p", "0", "--", "true"]);
    assert!(!bad.status.success());
    assert!(
        common::stderr(&bad).contains("invalid port 0: must be in range 1-65535"),
        "{}",
        common::stderr(&bad)
    );
    let mut child = env()
        .cmd()
        .args(["run", "--image", common::IMAGE, "-p"])
        .arg(format!("{port}:7000"))
        .args([
            "--address",
            "localhost",
            "--",
            "nc",
            "-l",
            "-p",
            "7000",
            "-e",
            "rev",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run -p");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("Forwarding") {
        line.clear();
        assert!(
            err.read_line(&mut line).expect("read") > 0,
            "run exited early"
        );
    }
    assert_eq!(
        line.trim(),
        format!("Forwarding 127.0.0.1:{port} -> sandbox:7000")
    );
    assert_eq!(common::forward_roundtrip(port, "ping\n"), "gnip\n");
    // nc exits after one connection, so the run ends with its exit code.
    assert!(child.wait().expect("wait").success());
}
