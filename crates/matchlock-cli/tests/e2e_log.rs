//! The console log is capped and rotated whatever the guest writes (issue 8 item 3): a
//! guest flooding its serial console and a command flooding its output (which `run` copies
//! into the log) leave at most `vm.log` + `vm.log.1` of the configured size, and the owner's
//! memory stays flat.

mod common;

use std::time::{Duration, Instant};

use common::{env, ok, stderr, stdout};

/// The cap used here (`MATCHLOCK_LOG_MAX_BYTES`), small so floods are quick under TCG.
const CAP: u64 = 256 * 1024;

fn size(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn console_and_output_floods_stay_within_the_cap() {
    let e = env();
    let out = e
        .cmd()
        .env("MATCHLOCK_LOG_MAX_BYTES", CAP.to_string())
        .args(["run", "--image", common::IMAGE, "-d"])
        .output()
        .expect("run -d");
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let _guard = e.guard(&id);
    let logs = e.state_dir().join("vms").join(&id).join("logs");
    let (log, rotated) = (logs.join("vm.log"), logs.join("vm.log.1"));
    let owner = e.owner_pid(&id);
    let rss_before = rss_kib(owner);

    // 4 MiB through the guest's serial console (16x the cap), as root in the guest.
    let t = Instant::now();
    let o = e.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "head -c 4194304 /dev/zero | tr '\\000' x > /dev/console; echo done",
    ]);
    assert_eq!(ok(&o).trim(), "done");
    eprintln!("serial flood of 4 MiB took {:?}", t.elapsed());
    // The copier may still be draining QEMU's pipe: wait for the marker.
    let o = e.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo END-OF-FLOOD > /dev/console",
    ]);
    ok(&o);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("END-OF-FLOOD")
    {
        assert!(Instant::now() < deadline, "marker never reached the log");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(size(&log) <= CAP, "vm.log {} > {CAP}", size(&log));
    assert!(size(&rotated) > 0, "no rotation happened");
    assert!(size(&rotated) <= CAP, "vm.log.1 {} > {CAP}", size(&rotated));

    // `matchlock log` shows the current file (capped too) and nothing breaks.
    let shown = ok(&e.run(&["log", &id]));
    assert!(
        shown.len() as u64 <= CAP,
        "log printed {} bytes",
        shown.len()
    );
    assert!(shown.contains("END-OF-FLOOD"));

    let rss_after = rss_kib(owner);
    assert!(
        rss_after < rss_before + 16 * 1024,
        "owner RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    e.kill_and_rm(&id);
}

#[test]
fn run_output_copied_to_the_log_is_capped() {
    let e = env();
    // `run --rm=false` copies the command's output into the log; 3 MiB of it.
    let child = e
        .cmd()
        .env("MATCHLOCK_LOG_MAX_BYTES", CAP.to_string())
        .args([
            "run",
            "--image",
            common::IMAGE,
            "--rm=false",
            "--hostname",
            "log-cap",
            "--",
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 3145728; echo; echo RUN-DONE",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let out = child.wait_with_output_after(e);
    assert!(
        out.contains("RUN-DONE"),
        "{}",
        &out[out.len().saturating_sub(200)..]
    );
}

/// Waits for the command output, then stops the kept sandbox and returns its stdout.
trait WaitKept {
    fn wait_with_output_after(self, e: &common::TestEnv) -> String;
}

impl WaitKept for std::process::Child {
    fn wait_with_output_after(mut self, e: &common::TestEnv) -> String {
        use std::io::Read;
        let mut so = self.stdout.take().expect("stdout");
        let mut text = String::new();
        // `--rm=false` keeps the sandbox after the command: read until the marker, then
        // find the sandbox, check its log, kill it.
        let mut buf = [0u8; 65536];
        while !text.contains("RUN-DONE") {
            let n = so.read(&mut buf).expect("read");
            assert!(n > 0, "run ended before the marker");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let list = ok(&e.run(&["list", "--running"]));
        let id = list
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .find(|id| stdout(&e.run(&["get", id])).contains("\"log-cap\""))
            .expect("the kept sandbox")
            .to_string();
        let logs = e.state_dir().join("vms").join(&id).join("logs");
        let (log, rotated) = (logs.join("vm.log"), logs.join("vm.log.1"));
        assert!(size(&log) <= CAP, "vm.log {} > {CAP}", size(&log));
        assert!(
            size(&rotated) > 0 && size(&rotated) <= CAP,
            "vm.log.1 {}",
            size(&rotated)
        );
        ok(&e.run(&["kill", &id]));
        let _ = self.wait();
        let _ = e.run(&["rm", &id]);
        text
    }
}
