//! A hostile guest (or a slow client) cannot make `matchlock rpc` grow without bound or stop
//! answering (issue 8): raw JSON-RPC lines against the built binary and real VMs, while the
//! test samples the server's resident memory from `/proc/<pid>/status`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::env;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The bound the server's resident memory must stay under while a guest floods output.
const RSS_BOUND_KIB: u64 = 100 * 1024;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64")
}

/// How the test reads the server's stdout.
struct ReadPace {
    /// Stop reading entirely.
    paused: AtomicBool,
    /// Sleep this many milliseconds before each line.
    delay_ms: AtomicU64,
    /// `exec_stream.stdout` notifications seen (counted and dropped, not queued).
    stream_lines: AtomicU64,
}

struct Rpc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    backlog: Vec<Value>,
    pace: Arc<ReadPace>,
}

impl Rpc {
    fn start() -> Rpc {
        let mut child = env()
            .cmd()
            .arg("rpc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rpc");
        let out = child.stdout.take().expect("stdout");
        let pace = Arc::new(ReadPace {
            paused: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            stream_lines: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let p = pace.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(4096, out);
            let mut line = String::new();
            loop {
                while p.paused.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let d = p.delay_ms.load(Ordering::SeqCst);
                if d > 0 {
                    std::thread::sleep(Duration::from_millis(d));
                }
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("server wrote invalid JSON: {e}"));
                if v["method"] == "exec_stream.stdout" {
                    p.stream_lines.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Rpc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            backlog: Vec::new(),
            pace,
        }
    }

    fn send(&mut self, v: Value) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(v.to_string().as_bytes()).expect("write");
        s.write_all(b"\n").expect("write");
        s.flush().expect("flush");
    }

    fn request(&mut self, method: &str, params: Value, id: u64) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}));
    }

    fn wait_for(&mut self, what: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => self.backlog.push(v),
                Err(e) => panic!("waiting for {what} ({within:?}): {e}"),
            }
        }
    }

    /// The next response for `id`, within `within`.
    fn response_within(&mut self, id: u64, within: Duration) -> Value {
        self.wait_for(&format!("response {id}"), within, move |v| {
            v.get("id") == Some(&json!(id))
                && (v.get("result").is_some() || v.get("error").is_some())
        })
    }

    fn call(&mut self, method: &str, params: Value, id: u64) -> Value {
        self.request(method, params, id);
        let r = self.response_within(id, TIMEOUT);
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    fn call_err(&mut self, method: &str, params: Value, id: u64) -> (i64, String) {
        self.request(method, params, id);
        let r = self.response_within(id, TIMEOUT);
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{method}: expected an error: {r}"));
        (
            e["code"].as_i64().expect("code"),
            e["message"].as_str().expect("message").to_string(),
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `close` and waits for the answer and the process exit.
    fn close(mut self, within: Duration) {
        self.request("close", json!({}), 999);
        let v = self.response_within(999, within);
        assert_eq!(v["result"], json!({}), "{v}");
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "rpc did not exit after close");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed bound: stop a server that may be growing at once (its VM dies with it).
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        self.pace.paused.store(false, Ordering::SeqCst);
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Samples `pid`'s RSS every 200 ms for `dur`; fails as soon as it passes the bound.
fn rss_stays_bounded(pid: u32, dur: Duration, phase: &str) -> u64 {
    let end = Instant::now() + dur;
    let mut max = 0;
    while Instant::now() < end {
        let rss = rss_kib(pid);
        max = max.max(rss);
        assert!(
            rss < RSS_BOUND_KIB,
            "{phase}: matchlock rpc RSS {rss} KiB exceeds {RSS_BOUND_KIB} KiB"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{phase}: max RSS {max} KiB over {dur:?}");
    max
}

/// Item 1 (output back-pressure), item 4 (stdin never blocks the reader) and item 5
/// (duplicate ids), on one VM.
#[test]
fn slow_reader_stdin_flood_and_duplicate_ids() {
    let mut r = Rpc::start();
    r.call("create", json!({"image": common::IMAGE}), 1);
    let pid = r.pid();
    println!("idle RSS {} KiB", rss_kib(pid));

    // 1. `cat /dev/zero` to a client that reads one line per 50 ms, then not at all.
    r.pace.delay_ms.store(50, Ordering::SeqCst);
    r.request("exec_stream", json!({"command": "cat /dev/zero"}), 10);
    matchlock_test_support::wait_until(TIMEOUT, "stream output", || {
        r.pace.stream_lines.load(Ordering::SeqCst) > 0
    })
    .expect("cat produces output");
    rss_stays_bounded(pid, Duration::from_secs(8), "slow reader");
    r.pace.paused.store(true, Ordering::SeqCst);
    rss_stays_bounded(pid, Duration::from_secs(6), "stopped reader");
    let seen = r.pace.stream_lines.load(Ordering::SeqCst);
    // Reading slowly again: `cancel` is answered ahead of the queued output.
    r.pace.paused.store(false, Ordering::SeqCst);
    let t = Instant::now();
    r.request("cancel", json!({"id": 10}), 11);
    let v = r.response_within(11, Duration::from_secs(5));
    assert_eq!(v["result"], json!({"cancelled": true}), "{v}");
    println!("cancel answered in {:?} behind a slow reader", t.elapsed());
    r.pace.delay_ms.store(0, Ordering::SeqCst);
    let v = r.response_within(10, Duration::from_secs(30));
    assert_eq!(v["error"]["code"], -32003, "{v}");
    let total = r.pace.stream_lines.load(Ordering::SeqCst);
    println!("stream notifications: {seen} while throttled, {total} in all");
    assert!(seen > 20, "the stream barely ran: {seen} notifications");

    // 4. A command that never reads stdin, and a client that keeps sending it: the server
    // keeps answering, `cancel` acts.
    r.request("exec_pipe", json!({"command": "exec sleep 600"}), 20);
    r.wait_for("pipe ready", TIMEOUT, |v| {
        v["method"] == "exec_pipe.ready" && v["params"]["id"] == 20
    });
    let chunk = b64(&vec![b'x'; 32 << 10]);
    for _ in 0..300 {
        r.send(json!({"jsonrpc":"2.0","method":"exec_pipe.stdin","params":{"id":20,"data":chunk}}));
    }
    let t = Instant::now();
    r.request("cancel", json!({"id": 20}), 21);
    let v = r.response_within(21, Duration::from_secs(10));
    assert_eq!(v["result"], json!({"cancelled": true}), "{v}");
    let v = r.response_within(20, Duration::from_secs(10));
    assert_eq!(v["error"]["code"], -32003, "{v}");
    println!("stdin flood: cancel answered in {:?}", t.elapsed());

    // 5. A duplicate in-flight id is refused; the first request completes normally.
    r.request("exec", json!({"command": "sleep 2; echo first"}), 30);
    r.request("exec", json!({"command": "echo second"}), 30);
    let v = r.response_within(30, TIMEOUT);
    assert_eq!(v["error"]["code"], -32600, "{v}");
    let m = v["error"]["message"].as_str().expect("message");
    assert!(m.contains("30") && m.contains("in flight"), "{m}");
    let v = r.response_within(30, TIMEOUT);
    assert_eq!(unb64(&v["result"]["stdout"]), b"first\n", "{v}");
    let v = r.call("exec", json!({"command": "echo again"}), 30);
    assert_eq!(unb64(&v["stdout"]), b"again\n");

    r.close(Duration::from_secs(30));
}

/// Item 2: captured output shares one budget per sandbox, fails with a clear error, and is
/// released when the request ends.
#[test]
fn capture_budget_is_shared_and_released() {
    let mut r = Rpc::start();
    r.call("create", json!({"image": common::IMAGE}), 1);
    let (code, msg) = r.call_err("exec", json!({"command": "yes"}), 2);
    assert_eq!(code, -32001, "{msg}");
    assert!(msg.contains("64 MiB capture budget"), "{msg}");
    let v = r.call("exec", json!({"command": "echo ok"}), 3);
    assert_eq!(unb64(&v["stdout"]), b"ok\n");

    // One request holds 40 MB of captured output; a concurrent 30 MB one does not fit.
    r.request(
        "exec",
        json!({"command": "head -c 40000000 /dev/zero; touch /tmp/held; exec sleep 600"}),
        4,
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = r.call("exec", json!({"command": "test -e /tmp/held"}), 5);
        if v["exit_code"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the 40 MB writer never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, msg) = r.call_err("exec", json!({"command": "head -c 30000000 /dev/zero"}), 6);
    assert_eq!(code, -32001, "{msg}");
    assert!(msg.contains("capture budget"), "{msg}");
    // Ending the holder releases its share.
    r.request("cancel", json!({"id": 4}), 7);
    let v = r.response_within(4, TIMEOUT);
    assert_eq!(v["error"]["code"], -32003, "{v}");
    let v = r.call("exec", json!({"command": "head -c 30000000 /dev/zero"}), 8);
    assert_eq!(unb64(&v["stdout"]).len(), 30_000_000);
    r.close(Duration::from_secs(30));
}
