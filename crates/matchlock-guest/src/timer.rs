//! Boot check that the guest's timer interrupts fire: a sleep started early in the boot must
//! have returned before `Ready` is sent.
//!
//! # Design
//! Once, under a loaded host (TCG, load average 14-16), a VM's local APIC timer never fired
//! (`LOC: 0` in `/proc/interrupts`): every later `sleep` hung forever while the boot itself
//! succeeded, so the failure surfaced minutes later as a hung command. [`Probe::start`] is
//! called at the start of the boot: a thread sleeps [`PROBE_SLEEP`] on `CLOCK_MONOTONIC`
//! (an hrtimer, woken by the timer interrupt) and reports back on a channel. Just before
//! `Ready`, [`Probe::finish`] takes the result; normally the sleep returned long ago, so the
//! check costs nothing on the boot's critical path. If it has not, it polls the channel,
//! yielding, until [`PROBE_DEADLINE`] measured on `CLOCK_MONOTONIC` from the start. Reading
//! the clock needs no interrupt (the TSC clocksource is read directly), and the wait may not
//! itself sleep or use a timed futex: both need the timer that is being checked. On failure
//! the boot fails with the `LOC` count in the message, so the sandbox never reports ready
//! with a dead timer.
//!
//! # Limitations
//! The check proves the timer worked once, before `Ready`; a timer that stops later is not
//! detected. The deadline is generous (a loaded TCG host can delay a 1 ms wake-up by
//! seconds), so a dead timer costs [`PROBE_DEADLINE`] of busy polling before the boot fails.

use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// How long the probe thread sleeps.
pub const PROBE_SLEEP: Duration = Duration::from_millis(1);
/// How long after [`Probe::start`] the sleep may take to return before the boot fails.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Why the timer check failed.
#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    #[error("starting the timer probe thread")]
    Spawn(#[source] std::io::Error),
    #[error(
        "a {sleep:?} sleep did not return within {waited:?}: the guest's timer interrupts do not \
         fire (local timer interrupts so far: {loc}; {clockevent}), so every sleep would hang"
    )]
    Dead {
        sleep: Duration,
        waited: Duration,
        loc: String,
        /// CPU 0's clock event device as `/proc/timer_list` shows it (cause not known yet:
        /// the device, its mode and its next event tell a timer never programmed from one
        /// programmed but never delivered).
        clockevent: String,
    },
    #[error("the timer probe thread ended without reporting")]
    Lost,
}

/// A sleep running in its own thread since boot start.
pub struct Probe {
    started: Instant,
    done: Receiver<Duration>,
}

impl Probe {
    /// Starts the probe thread (real `std::thread::sleep`, i.e. `clock_nanosleep`).
    pub fn start() -> Result<Self, TimerError> {
        Self::start_with(|| std::thread::sleep(PROBE_SLEEP))
    }

    /// Starts a probe whose "sleep" is `sleep` (tests substitute one that never returns).
    pub fn start_with(sleep: impl FnOnce() + Send + 'static) -> Result<Self, TimerError> {
        let (tx, done) = mpsc::sync_channel(1);
        let started = Instant::now();
        std::thread::Builder::new()
            .name("timer-probe".into())
            .spawn(move || {
                let t = Instant::now();
                sleep();
                let _ = tx.send(t.elapsed());
            })
            .map_err(TimerError::Spawn)?;
        Ok(Self { started, done })
    }

    /// Waits (polling, never sleeping) until the probe's sleep returned or `deadline` after
    /// the start passed. Returns how long the sleep took.
    pub fn finish(self, deadline: Duration) -> Result<Duration, TimerError> {
        loop {
            match self.done.try_recv() {
                Ok(slept) => return Ok(slept),
                Err(TryRecvError::Disconnected) => return Err(TimerError::Lost),
                Err(TryRecvError::Empty) => {}
            }
            let waited = self.started.elapsed();
            if waited > deadline {
                return Err(TimerError::Dead {
                    sleep: PROBE_SLEEP,
                    waited,
                    loc: local_timer_count().unwrap_or_else(|| "unknown".into()),
                    clockevent: read_bounded("/proc/timer_list", 256 * 1024)
                        .and_then(|t| cpu0_clockevent(&t))
                        .unwrap_or_else(|| "clock event device unknown".into()),
                });
            }
            std::thread::yield_now();
        }
    }
}

/// The total of the `LOC:` row of `/proc/interrupts` (local timer interrupts), if readable.
fn local_timer_count() -> Option<String> {
    let text = read_bounded("/proc/interrupts", 256 * 1024)?;
    parse_loc(&text).map(|n| n.to_string())
}

fn read_bounded(path: &str, limit: u64) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(limit)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// `now`, and CPU 0's clock event device with its mode and next event, from
/// `/proc/timer_list` text.
fn cpu0_clockevent(text: &str) -> Option<String> {
    let now = text
        .lines()
        .find_map(|l| l.strip_prefix("now at "))
        .map(str::trim);
    // CPU 0's block: the device line right after its header, then its fields.
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "Per CPU device: 0")
        .skip(1)
        .take(40)
        .map(str::trim)
        .collect();
    let device = block.first()?.strip_prefix("Clock Event Device:")?.trim();
    let field = |name: &str| {
        block
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?", str::trim)
    };
    Some(format!(
        "clock event device {device}, mode {}, next event {}, now {}",
        field("mode:"),
        field("next_event:"),
        now.unwrap_or("?")
    ))
}

/// Sums the per-CPU counts of the `LOC:` row of `/proc/interrupts` text.
fn parse_loc(text: &str) -> Option<u64> {
    let row = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("LOC:"))?;
    let counts: Vec<u64> = row
        .split_whitespace()
        .map_while(|w| w.parse::<u64>().ok())
        .collect();
    if counts.is_empty() {
        return None;
    }
    Some(counts.iter().fold(0u64, |a, b| a.saturating_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_that_returns_passes() {
        let probe = Probe::start().expect("start");
        let slept = probe.finish(Duration::from_secs(10)).expect("timer works");
        assert!(slept >= PROBE_SLEEP, "{slept:?}");
    }

    #[test]
    fn a_sleep_that_never_returns_fails_by_the_deadline() {
        // Blocks until the test ends (the sender is dropped with `hold`).
        let (hold, wait) = mpsc::channel::<()>();
        let probe = Probe::start_with(move || {
            let _ = wait.recv();
        })
        .expect("start");
        let t = Instant::now();
        let err = probe
            .finish(Duration::from_millis(200))
            .expect_err("a dead timer must fail");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let msg = err.to_string();
        assert!(msg.contains("timer interrupts do not fire"), "{msg}");
        assert!(msg.contains("local timer interrupts so far"), "{msg}");
        drop(hold);
    }

    #[test]
    fn a_probe_thread_that_dies_is_reported() {
        let probe = Probe::start_with(|| panic!("probe thread dies")).expect("start");
        assert!(matches!(
            probe.finish(Duration::from_secs(10)),
            Err(TimerError::Lost)
        ));
    }

    #[test]
    fn cpu0_clock_event_device_is_summarised() {
        let text =
            "Timer List Version: v0.9\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 2070398866 nsecs\n\n\
                    cpu: 0\n clock 0:\n  .base: 0\n\n\
                    Tick Device: mode:     1\nBroadcast device\nClock Event Device: <NULL>\n\n\
                    Tick Device: mode:     1\nPer CPU device: 0\nClock Event Device: lapic\n\
                     max_delta_ns:   137438953451\n min_delta_ns:   1000\n mode:           3\n\
                     next_event:     2071000000 nsecs\n set_next_event: lapic_next_event\n";
        assert_eq!(
            cpu0_clockevent(text).as_deref(),
            Some(
                "clock event device lapic, mode 3, next event 2071000000 nsecs, now 2070398866 nsecs"
            )
        );
        assert_eq!(cpu0_clockevent("Tick Device: mode: 1\n"), None);
    }

    #[test]
    fn loc_row_is_summed_over_cpus() {
        let text = "           CPU0       CPU1\n 48:   0   0   IO-APIC   9-edge  ACPI:Ged\n\
                    NMI:   0   0   Non-maskable interrupts\n\
                    LOC:   279   21   Local timer interrupts\n\
                    SPU:   0   0   Spurious interrupts\n";
        assert_eq!(parse_loc(text), Some(300));
        assert_eq!(
            parse_loc("LOC:          0   Local timer interrupts\n"),
            Some(0)
        );
        assert_eq!(parse_loc("NMI: 0\n"), None);
        assert_eq!(parse_loc("LOC: Local timer interrupts\n"), None);
    }
}
