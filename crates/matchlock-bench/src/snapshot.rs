//! `matchlock-bench snapshot`: snapshot boot (`MATCHLOCK_DEV_SNAPSHOT=1`) vs. a cold boot
//! over the same (virtio-serial) channel vs. a bare QEMU boot, interleaved per round.
//!
//! # Design
//! Rows: `run -- true` wall time restored vs. cold vs. the bare boot to init and power-off;
//! `run -d` until ready plus the first `exec true` (restore to first exec, through the
//! CLI); the first run, which makes the snapshot. The host's load average is printed with
//! the figures, since every figure on these shared machines moves with it.
//!
//! # Limitations
//! Wall times of whole CLI invocations: they include the owner's start, disk creation and
//! shutdown, which the study's restore-to-first-exec figure (docs/snapshots.md) does not.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{median, ms, Bench, IMAGE};

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Bench {
    fn serial_cmd(&self, snapshot: bool) -> std::process::Command {
        let mut c = self.matchlock();
        c.env("MATCHLOCK_DEV_CHANNEL", "serial");
        if snapshot {
            c.env("MATCHLOCK_DEV_SNAPSHOT", "1");
        } else {
            c.env_remove("MATCHLOCK_DEV_SNAPSHOT");
        }
        c
    }

    fn timed_true(&self, snapshot: bool) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let st = self
            .serial_cmd(snapshot)
            .args(["run", "--image", IMAGE, "--", "true"])
            .status()?;
        if !st.success() {
            bail!("matchlock run failed: {st}");
        }
        Ok(t.elapsed())
    }

    /// `run -d` until ready, then the first `exec true`: (ready, first exec done).
    fn restored_first_exec(&self) -> anyhow::Result<(Duration, Duration)> {
        let t = Instant::now();
        let out = self
            .serial_cmd(true)
            .args(["run", "--image", IMAGE, "-d"])
            .output()?;
        if !out.status.success() {
            bail!("run -d: {}", String::from_utf8_lossy(&out.stderr));
        }
        let ready = t.elapsed();
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let st = self
            .serial_cmd(true)
            .args(["exec", &id, "--", "true"])
            .status()
            .context("exec")?;
        let first = t.elapsed();
        let _ = self.serial_cmd(true).args(["kill", &id]).status();
        let gone = Instant::now() + Duration::from_secs(30);
        while Instant::now() < gone {
            let rm = self.serial_cmd(true).args(["rm", &id]).output()?;
            if rm.status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !st.success() {
            bail!("exec true in the restored sandbox failed: {st}");
        }
        Ok((ready, first))
    }

    pub(crate) fn snapshot(&self) -> anyhow::Result<()> {
        let before = loadavg();
        self.bare_boot()?;
        let first = self.timed_true(true)?;
        let (mut bare, mut cold, mut restored, mut ready, mut exec) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            bare.push(self.bare_boot()?);
            cold.push(self.timed_true(false)?);
            restored.push(self.timed_true(true)?);
            let (r, e) = self.restored_first_exec()?;
            ready.push(r);
            exec.push(e);
        }
        let (b, c, r) = (median(bare), median(cold), median(restored));
        println!(
            "snapshot boot ({} runs, medians; load average before {before}, after {}):",
            self.runs,
            loadavg()
        );
        println!(
            "  first run (cold boot + make snapshot + restore): {}",
            ms(first)
        );
        println!("  bare QEMU boot to init + power-off:     {}", ms(b));
        println!("  run -- true, cold (serial channel):     {}", ms(c));
        println!("  run -- true, restored:                  {}", ms(r));
        println!(
            "  run -d restored until ready:            {}",
            ms(median(ready))
        );
        println!(
            "  run -d restored + first exec true:      {}",
            ms(median(exec))
        );
        println!(
            "  ratios: restored/cold {:.2}, restored/bare {:.2}",
            r.as_secs_f64() / c.as_secs_f64(),
            r.as_secs_f64() / b.as_secs_f64()
        );
        Ok(())
    }
}
