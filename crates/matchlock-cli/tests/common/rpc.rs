//! A `matchlock rpc` process spoken to with raw JSON lines (the tests check the wire
//! itself, so they do not use an SDK).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::env;

/// Default wait for a response or notification.
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub fn unb64(v: &Value) -> String {
    let d = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64");
    String::from_utf8_lossy(&d).into_owned()
}

pub struct Rpc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Lines received while waiting for something else.
    backlog: Vec<Value>,
    timeout: Duration,
}

impl Rpc {
    pub fn start() -> Rpc {
        let mut cmd = env().cmd();
        cmd.arg("rpc");
        Rpc::spawn(cmd)
    }

    /// `matchlock rpc` in a network namespace of its own holding only a loopback that is
    /// down (`unshare --net`, needs root): whatever its guests do, no packet can leave.
    #[allow(dead_code)] // not every test file uses it
    pub fn start_isolated() -> Rpc {
        let template = env().cmd();
        let mut cmd = Command::new("unshare");
        cmd.arg("--net").arg("--").arg(template.get_program());
        cmd.args(template.get_args()).arg("rpc");
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        Rpc::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> Rpc {
        let mut child = cmd
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
                    .unwrap_or_else(|e| panic!("server wrote invalid JSON {line:?}: {e}"));
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
            timeout: TIMEOUT,
        }
    }

    /// Waits up to `t` for each response instead of the default.
    pub fn with_timeout(mut self, t: Duration) -> Rpc {
        self.timeout = t;
        self
    }

    pub fn send_raw(&mut self, line: &[u8]) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(line).expect("write");
        s.write_all(b"\n").expect("write");
        s.flush().expect("flush");
    }

    pub fn send(&mut self, v: Value) {
        self.send_raw(v.to_string().as_bytes());
    }

    pub fn request(&mut self, method: &str, params: Value, id: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}));
    }

    /// Waits for the first line matching `pred` (earlier non-matching lines are kept).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => self.backlog.push(v),
                Err(e) => panic!("waiting for {what}: {e}; backlog: {:?}", self.backlog),
            }
        }
    }

    pub fn response(&mut self, id: &Value) -> Value {
        let id = id.clone();
        self.wait_for(&format!("response {id}"), move |v| {
            v.get("id") == Some(&id) && (v.get("result").is_some() || v.get("error").is_some())
        })
    }

    /// Sends a request and returns its `result`, panicking on an error response.
    pub fn call(&mut self, method: &str, params: Value, id: u64) -> Value {
        self.request(method, params, json!(id));
        let r = self.response(&json!(id));
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// Sends a request and returns its error `(code, message)`.
    pub fn call_err(&mut self, method: &str, params: Value, id: u64) -> (i64, String) {
        self.request(method, params, json!(id));
        let r = self.response(&json!(id));
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{method}: expected an error: {r}"));
        (
            e["code"].as_i64().expect("code"),
            e["message"].as_str().expect("message").to_string(),
        )
    }

    /// Notifications `method` for request `id`, concatenated (base64-decoded `data`).
    pub fn take_data(&mut self, method: &str, id: u64) -> String {
        let mut out = String::new();
        self.backlog.retain(|v| {
            if v["method"] == method && v["params"]["id"] == json!(id) {
                out.push_str(&unb64(&v["params"]["data"]));
                false
            } else {
                true
            }
        });
        out
    }

    pub fn create(&mut self) -> String {
        let r = self.call("create", json!({"image": super::IMAGE}), 1);
        r["id"].as_str().expect("vm id").to_string()
    }

    /// Closes stdin and waits for the process to exit.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "rpc did not exit after EOF");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
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
