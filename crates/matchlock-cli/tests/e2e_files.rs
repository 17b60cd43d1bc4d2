//! Guest file operations at scale, through `matchlock rpc` and a real VM: a directory whose
//! listing is many times larger than one protocol frame is listed completely.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use base64::Engine;
use common::env;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(300);

/// Entries created in the guest; with [`NAME_LEN`]-byte names their JSON is ~5 MiB, five
/// times the protocol's largest frame payload (1 MiB).
const ENTRIES: usize = 20_000;
/// Length of every created name (ext4 allows 255).
const NAME_LEN: usize = 200;

/// A `matchlock rpc` process spoken to with raw JSON lines.
struct Rpc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
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
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("server wrote invalid JSON: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Rpc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
        }
    }

    /// Sends a request and returns its `result`, panicking on an error response.
    fn call(&mut self, method: &str, params: Value, id: u64) -> Value {
        let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(format!("{req}\n").as_bytes()).expect("write");
        s.flush().expect("flush");
        loop {
            let v = self
                .lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|e| panic!("waiting for the {method} response: {e}"));
            if v.get("id") == Some(&json!(id)) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unb64(v: &Value) -> String {
    let d = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64");
    String::from_utf8_lossy(&d).into_owned()
}

#[test]
fn list_files_returns_a_listing_larger_than_one_frame() {
    let mut r = Rpc::start();
    r.call("create", json!({"image": common::IMAGE}), 1);
    let prefix = "n".repeat(NAME_LEN - 5);
    // Shell built-ins only (`:` with a redirection): no fork per file, fast under TCG.
    let script = format!(
        "mkdir -p /tmp/many/sub && cd /tmp/many && i=10000; \
         while [ $i -lt {} ]; do : > {prefix}$i; i=$((i+1)); done; ls | wc -l",
        10_000 + ENTRIES - 1
    );
    let v = r.call("exec", json!({ "command": script }), 2);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(unb64(&v["stdout"]).trim(), ENTRIES.to_string());

    let v = r.call("list_files", json!({"path": "/tmp/many"}), 3);
    let files = v["files"].as_array().expect("files array");
    assert_eq!(files.len(), ENTRIES, "every entry is listed");
    let names: Vec<&str> = files
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    let mut expected: Vec<String> = (10_000..10_000 + ENTRIES - 1)
        .map(|i| format!("{prefix}{i}"))
        .collect();
    expected.push("sub".into());
    expected.sort();
    assert_eq!(names, expected, "sorted by name, each once");
    let sub = files.iter().find(|f| f["name"] == "sub").expect("sub");
    assert_eq!(sub["is_dir"], true);
    let first = &files[0];
    assert_eq!(
        (first["is_dir"].clone(), first["size"].clone()),
        (json!(false), json!(0))
    );

    // Small listings are unchanged.
    let v = r.call("list_files", json!({"path": "/tmp/many/sub"}), 4);
    assert_eq!(v["files"], json!([]));
}
