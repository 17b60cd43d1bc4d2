//! Test harness for the built `matchlock` binary: an isolated HOME per test process, the
//! default busybox image imported once, and helpers to run commands.
//!
//! The guest kernel and runtime come from `MATCHLOCK_KERNEL` / `MATCHLOCK_GUEST_INIT` (set by
//! scripts/test.sh) or the standard build locations; if they are missing the tests FAIL with
//! a message saying how to build them (never skipped).

#![allow(dead_code)]

pub mod rpc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub const IMAGE: &str = "busybox:test";

pub struct TestEnv {
    pub home: tempfile::TempDir,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_INIT") {
        return PathBuf::from(p);
    }
    let p = repo_root().join("target/x86_64-unknown-linux-gnu/release/matchlock-guest");
    assert!(
        p.is_file(),
        "guest runtime not built at {}: run scripts/build-guest.sh (or scripts/test.sh)",
        p.display()
    );
    p
}

fn kernel() -> PathBuf {
    if let Some(p) = std::env::var_os("MATCHLOCK_KERNEL") {
        return PathBuf::from(p);
    }
    let out = Command::new(repo_root().join("scripts/build-kernel.sh"))
        .arg("--print-path")
        .output()
        .expect("run build-kernel.sh --print-path");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        p.is_file(),
        "guest kernel not built at {}: run scripts/build-kernel.sh",
        p.display()
    );
    p
}

const HOME_PREFIX: &str = "ml-e2e-";
const OWNER_FILE: &str = ".ml-e2e-owner";

/// Removes the test homes of test processes that are gone. The home lives in a static,
/// and statics are never dropped, so each test binary's home (~100 MB with its image)
/// would otherwise stay behind after every run.
fn sweep_stale_homes(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(HOME_PREFIX) {
            continue;
        }
        let dir = e.path();
        let alive = match std::fs::read_to_string(dir.join(OWNER_FILE)) {
            Ok(pid) => Path::new("/proc").join(pid.trim()).exists(),
            // A home still being set up has no owner file yet: leave young ones alone.
            Err(_) => e.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                t.elapsed().unwrap_or_default() < std::time::Duration::from_secs(3600)
            }),
        };
        if !alive {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// One environment per test binary: sandboxes of all its tests share HOME and the image.
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let root = std::env::var_os("MATCHLOCK_TEST_TMP")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        sweep_stale_homes(&root);
        let home = tempfile::Builder::new()
            .prefix(HOME_PREFIX)
            .tempdir_in(&root)
            .expect("temp home");
        std::fs::write(home.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("record the test home's owner");
        let env = TestEnv { home };
        let mut archive = Vec::new();
        matchlock_test_support::busybox_image(&mut archive).expect("build busybox image");
        let out = env.run_stdin(&["image", "import", IMAGE], &archive);
        assert!(
            out.status.success(),
            "image import failed: {}",
            stderr(&out)
        );
        env
    })
}

impl TestEnv {
    /// `program` with this environment's variables (HOME, kernel, guest runtime) and
    /// `MATCHLOCK_BIN`: how a client launched by a test (an SDK) finds `matchlock`.
    pub fn client_cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let template = self.cmd();
        let mut c = Command::new(program);
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.env("MATCHLOCK_BIN", env!("CARGO_BIN_EXE_matchlock"));
        c
    }

    /// The published Python SDK's interpreter running `tests/python/<script>` against
    /// this environment, with `MATCHLOCK_TEST_IMAGE` set to [`IMAGE`].
    pub fn python_sdk(&self, script: &str) -> Command {
        let mut c = self.client_cmd(sdk_python());
        c.arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/python")
                .join(script),
        )
        .env("MATCHLOCK_TEST_IMAGE", IMAGE);
        c
    }

    /// `matchlock` as [`TestEnv::cmd`] runs it, started by `sh` after `ulimit <limit>`
    /// (e.g. `-Sn 256`): the sandbox owner inherits the lowered resource limit.
    pub fn cmd_with_ulimit(&self, limit: &str) -> Command {
        let base = self.cmd();
        let mut c = Command::new("sh");
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.args(["-c", &format!("ulimit {limit} && exec \"$0\" \"$@\"")])
            .arg(base.get_program())
            .stdin(Stdio::null());
        c
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_matchlock"));
        c.env("HOME", self.home.path())
            .env("XDG_CACHE_HOME", self.home.path().join(".cache"))
            .env("MATCHLOCK_KERNEL", kernel())
            .env("MATCHLOCK_GUEST_INIT", guest_binary())
            .env("MATCHLOCK_QUIET_ACCEL", "1")
            .env_remove("MATCHLOCK_ACCEL")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("spawn matchlock")
    }

    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn matchlock");
        let mut stdin = child.stdin.take().expect("stdin");
        let data = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait");
        writer.join().expect("stdin writer");
        out
    }

    /// `matchlock run --image IMAGE <args>`.
    pub fn sandbox(&self, args: &[&str]) -> Output {
        let mut full = vec!["run", "--image", IMAGE];
        full.extend_from_slice(args);
        self.run(&full)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.home.path().join(".matchlock")
    }

    /// Starts a detached sandbox and returns its id.
    pub fn detached(&self, extra: &[&str]) -> String {
        let mut args = vec!["run", "--image", IMAGE, "-d"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.status.success(), "run -d failed: {}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        assert!(id.starts_with("vm-"), "unexpected id {id:?}");
        id
    }

    /// The pid of sandbox `id`'s owner process, from `matchlock get`.
    pub fn owner_pid(&self, id: &str) -> u32 {
        let rec: serde_json::Value =
            serde_json::from_str(&ok(&self.run(&["get", id]))).expect("get json");
        let pid = rec["pid"].as_u64().expect("owner pid");
        u32::try_from(pid).expect("pid fits u32")
    }

    /// Kills the sandbox when dropped, so a failing test does not leave a VM running.
    pub fn guard(&self, id: &str) -> KillOnDrop<'_> {
        KillOnDrop {
            env: self,
            id: id.to_string(),
        }
    }

    pub fn kill_and_rm(&self, id: &str) {
        let _ = self.run(&["kill", id]);
        let _ =
            matchlock_test_support::wait_until(Duration::from_secs(30), "sandbox stopped", || {
                !stdout(&self.run(&["list", "--running"])).contains(id)
            });
        let _ = self.run(&["rm", id]);
    }
}

pub struct KillOnDrop<'a> {
    env: &'a TestEnv,
    id: String,
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        // Harmless when the test already killed and removed it.
        let _ = self.env.run(&["kill", &self.id]);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// The virtualenv python with the published SDK (`matchlock==0.2.17`), installed and cached
/// by scripts/python-sdk-venv.sh.
#[allow(dead_code)] // not every test file uses it
pub fn sdk_python() -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python-sdk-venv.sh");
    let out = Command::new(&script)
        .output()
        .expect("run scripts/python-sdk-venv.sh");
    assert!(
        out.status.success(),
        "installing matchlock==0.2.17 into a virtualenv failed (needs python3-venv and PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sends `msg` to 127.0.0.1:`port` (a published port), half-closes, and returns the reply;
/// retries every 200 ms for up to 60 s while the guest's service is still starting.
pub fn forward_roundtrip(port: u16, msg: &str) -> String {
    use std::io::Read;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        c.write_all(msg.as_bytes()).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        if !out.is_empty() {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reply through the forward"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
