//! `matchlock-bench scale`: many sandboxes at once (issue 11 item 3).
//!
//! Two measurements, one run each (the machine is shared and noisy), on each boot path:
//! restored from the cached post-boot snapshot (what `run` does by default) and cold booted
//! (`MATCHLOCK_NO_SNAPSHOT=1`, what the first run and `--no-snapshot` do).
//! - **Concurrent starts**: for 1, 4, 16 and 64 sandboxes, that many `matchlock run --rm
//!   --memory 256 -- true` are launched at the same instant; the row is the wall time until
//!   the last one exits and the number that failed (the first failure's stderr is shown).
//!   Target: 64 at once all succeed on a 2-core, 24 GiB machine.
//! - **Idle memory curve**: detached sandboxes (`run -d --memory 256`) are started up to 1,
//!   16 and 64 kept running; at each step the proportional set size of every host process of
//!   every sandbox (the owner, QEMU and the vsock helper, from the state database's process
//!   records) is summed and divided by the count, and the host's `MemAvailable` drop since
//!   before the first one is printed beside it. PSS splits pages shared between processes
//!   (guest RAM mapped by QEMU and the helper, the shared binaries) so the per-sandbox sum
//!   does not count them twice.
//!
//! # Limitations
//! The starts are launched by this process with `std::process::Command`, so the time
//! includes CLI start-up, image lookup and state-database contention, which is what a user
//! running many sandboxes sees. Idle sandboxes are started in batches of [`START_BATCH`] to
//! keep the machine's load comparable between steps; the curve is PSS after start, not
//! after a workload.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::net::{mib, pss_kib};
use crate::{Bench, IMAGE};

/// Concurrency levels of the start benchmark.
const LEVELS: [usize; 4] = [1, 4, 16, 64];
/// Idle counts at which memory is sampled.
const IDLE_STEPS: [usize; 3] = [1, 16, 64];
/// Guest memory of every sandbox here (MiB).
const MEMORY_MB: &str = "256";
/// Detached sandboxes started at the same time while filling the idle set.
const START_BATCH: usize = 8;
/// Longest a single start may take before the benchmark calls it failed.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// Outcome of one concurrency level.
struct Level {
    n: usize,
    wall: Duration,
    failed: usize,
    first_error: Option<String>,
}

/// Host memory with `count` idle sandboxes.
struct IdleStep {
    count: usize,
    pss_per_sandbox_kib: u64,
    available_drop_kib: u64,
}

impl Bench {
    pub(crate) fn scale(&self) -> anyhow::Result<()> {
        for snapshot in [true, false] {
            // One start first so caches (initramfs, page cache, the snapshot) are warm for
            // every level.
            let (failed, first) = self.wait_all(vec![self.spawn_run(snapshot)?])?;
            if failed > 0 {
                bail!("warm-up run failed: {}", first.unwrap_or_default());
            }
            let mut levels = Vec::new();
            for n in LEVELS {
                levels.push(self.level(n, snapshot)?);
            }
            let idle = self.idle_curve(snapshot)?;
            print_scale(snapshot, &levels, &idle);
        }
        Ok(())
    }

    fn spawn_run(&self, snapshot: bool) -> anyhow::Result<Child> {
        self.matchlock_boot(snapshot)
            .args([
                "run", "--rm", "--memory", MEMORY_MB, "--image", IMAGE, "--", "true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn matchlock run")
    }

    /// Waits for every child; returns (failures, first failure's stderr).
    fn wait_all(&self, children: Vec<Child>) -> anyhow::Result<(usize, Option<String>)> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut failed = 0;
        let mut first = None;
        for mut c in children {
            let status = loop {
                if let Some(s) = c.try_wait()? {
                    break Some(s);
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if status.is_some_and(|s| s.success()) {
                continue;
            }
            failed += 1;
            if first.is_none() {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                first = Some(match status {
                    Some(s) => format!("{s}: {}", err.trim()),
                    None => format!("timed out after {START_TIMEOUT:?}"),
                });
            }
        }
        Ok((failed, first))
    }

    fn level(&self, n: usize, snapshot: bool) -> anyhow::Result<Level> {
        let t = Instant::now();
        let children = (0..n)
            .map(|_| self.spawn_run(snapshot))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (failed, first_error) = self.wait_all(children)?;
        Ok(Level {
            n,
            wall: t.elapsed(),
            failed,
            first_error,
        })
    }

    /// Starts `count` detached sandboxes in batches; returns their ids.
    fn start_idle(&self, count: usize, snapshot: bool) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        while ids.len() < count {
            let batch = START_BATCH.min(count - ids.len());
            let children = (0..batch)
                .map(|_| {
                    self.matchlock_boot(snapshot)
                        .args(["run", "-d", "--memory", MEMORY_MB, "--image", IMAGE])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .context("spawn matchlock run -d")
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for c in children {
                let o = c.wait_with_output()?;
                if !o.status.success() {
                    bail!(
                        "matchlock run -d failed with {} running: {}",
                        ids.len(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
                ids.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
            }
        }
        Ok(ids)
    }

    /// PSS (KiB) of every host process of sandbox `id`: owner plus recorded processes.
    fn sandbox_pss(&self, state: &matchlock_state::StateDb, id: &str) -> anyhow::Result<u64> {
        let mut total = pss_kib(state.get(id)?.pid)?;
        let record = state
            .lifecycle_latest(id)?
            .with_context(|| format!("no lifecycle record for {id}"))?;
        for p in &record.resources.processes {
            total += pss_kib(p.pid)?;
        }
        Ok(total)
    }

    fn idle_curve(&self, snapshot: bool) -> anyhow::Result<Vec<IdleStep>> {
        let before = mem_available_kib()?;
        let mut ids: Vec<String> = Vec::new();
        let mut steps = Vec::new();
        let result = (|| {
            for count in IDLE_STEPS {
                ids.extend(self.start_idle(count - ids.len(), snapshot)?);
                // Let the guests settle (init done, agents idle) before sampling.
                std::thread::sleep(Duration::from_secs(3));
                let state = matchlock_state::StateDb::open(&self.paths().state)?;
                let mut total = 0;
                for id in &ids {
                    total += self.sandbox_pss(&state, id)?;
                }
                steps.push(IdleStep {
                    count,
                    pss_per_sandbox_kib: total / count as u64,
                    available_drop_kib: before.saturating_sub(mem_available_kib()?),
                });
            }
            anyhow::Ok(())
        })();
        for id in &ids {
            self.stop_sandbox(id);
        }
        result.map(|()| steps)
    }
}

/// `MemAvailable:` of `/proc/meminfo` in KiB.
fn mem_available_kib() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

fn print_scale(snapshot: bool, levels: &[Level], idle: &[IdleStep]) {
    println!(
        "boot path: {}",
        if snapshot {
            "restored from the cached snapshot (the default)"
        } else {
            "cold boot (MATCHLOCK_NO_SNAPSHOT=1)"
        }
    );
    println!("concurrent starts (`run --rm --memory {MEMORY_MB} -- true`, one run each):");
    for l in levels {
        println!(
            "  {:>2} at once: {:>8.2} s wall, {} failed{}",
            l.n,
            l.wall.as_secs_f64(),
            l.failed,
            if l.n == 64 { " (target: 0 failed)" } else { "" }
        );
        if let Some(e) = &l.first_error {
            println!("     first failure: {e}");
        }
    }
    println!("idle sandboxes (`run -d --memory {MEMORY_MB}`), host memory:");
    for s in idle {
        println!(
            "  {:>2} running: {} PSS per sandbox (owner + QEMU + helpers), MemAvailable down {}",
            s.count,
            mib(s.pss_per_sandbox_kib),
            mib(s.available_drop_kib)
        );
    }
}
