//! `matchlock-bench snapshot`: snapshot boot (the default) vs. a cold boot (`MATCHLOCK_NO_SNAPSHOT=1`)
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

use matchlock_sandbox::phases::{monotonic_us, BootTrace};

use crate::{loadavg, median, met, ms, Bench, IMAGE};

/// Named instants of one restored `run -d` + first exec, as time since `run -d` started.
type Steps = Vec<(String, Duration)>;

/// Prints each step's median duration (from the previous step) over `runs`, skipping
/// steps not present in every run.
fn print_steps(runs: &[Steps]) {
    let Some(first) = runs.first() else { return };
    println!(
        "  restored run -d + first exec, per step (median of each step; host monotonic clock):"
    );
    let mut prev: Option<&str> = None;
    for (name, _) in first {
        let at = |r: &Steps, n: &str| r.iter().find(|(m, _)| m == n).map(|(_, d)| *d);
        let deltas: Option<Vec<Duration>> = runs
            .iter()
            .map(|r| {
                let end = at(r, name)?;
                let start = prev.map_or(Some(Duration::ZERO), |p| at(r, p))?;
                Some(end.saturating_sub(start))
            })
            .collect();
        let ats: Option<Vec<Duration>> = runs.iter().map(|r| at(r, name)).collect();
        if let (Some(d), Some(a)) = (deltas, ats) {
            let from = prev.unwrap_or("run -d start");
            println!(
                "    {from:>16} -> {name:<16} {:>10}   (at {})",
                ms(median(d)),
                ms(median(a))
            );
        }
        prev = Some(name);
    }
}

impl Bench {
    fn serial_cmd(&self, snapshot: bool) -> std::process::Command {
        let mut c = self.matchlock_boot(snapshot);
        c.env("MATCHLOCK_DEV_CHANNEL", "serial")
            .env_remove("MATCHLOCK_DEV_SNAPSHOT");
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

    /// `run -d` until ready, then the first `exec true`: (ready, first exec done, the
    /// owner's boot trace as steps from the start of `run -d`).
    fn restored_first_exec(&self) -> anyhow::Result<(Duration, Duration, Steps)> {
        let t0 = monotonic_us();
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
        let log = matchlock_state::StateDb::open(&self.paths().state)?
            .vm_dir(&id)
            .join("logs/vm.log");
        let mut steps: Steps = BootTrace::parse(&std::fs::read_to_string(log).unwrap_or_default())
            .into_iter()
            .map(|(name, us)| {
                (
                    name,
                    Duration::from_micros(u64::try_from(us.saturating_sub(t0)).unwrap_or(0)),
                )
            })
            .collect();
        steps.push(("run -d returned".into(), ready));
        steps.push(("first exec done".into(), first));
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
        Ok((ready, first, steps))
    }

    pub(crate) fn snapshot(&self) -> anyhow::Result<()> {
        let before = loadavg();
        self.bare_boot()?;
        let first = self.timed_true(true)?;
        let (mut bare, mut cold, mut restored, mut ready, mut exec) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut steps = Vec::new();
        for _ in 0..self.runs {
            bare.push(self.bare_boot()?);
            cold.push(self.timed_true(false)?);
            restored.push(self.timed_true(true)?);
            let (r, e, s) = self.restored_first_exec()?;
            ready.push(r);
            exec.push(e);
            steps.push(s);
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
        print_steps(&steps);
        let to_bare = r.as_secs_f64() / b.as_secs_f64();
        println!(
            "  ratios: restored/cold {:.2}, restored/bare {to_bare:.2} (cold start target <= 1.15: {})",
            r.as_secs_f64() / c.as_secs_f64(),
            met(to_bare <= 1.15)
        );
        let first_exec = median(exec);
        println!(
            "  restore to first exec (run -d + exec true): {} (target <= 350 ms: {})",
            ms(first_exec),
            met(first_exec <= Duration::from_millis(350))
        );
        Ok(())
    }
}
