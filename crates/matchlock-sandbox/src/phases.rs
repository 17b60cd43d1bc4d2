//! The cold-start breakdown (issue 11 item 2): where one sandbox's boot time went.
//!
//! # Design
//! Host steps are timed with the host's monotonic clock around them. What happens inside
//! the VM is timed by the guest itself: its `/init` reports, in the `Ready` frame
//! ([`ReadyTimes`]), its `CLOCK_BOOTTIME` (time since the kernel started) when it began, when
//! it sent `Hello` and when it sent `Ready`. The two clocks are tied together at one event
//! only, `Hello`: the host notes when it received it, so "QEMU to kernel" is the host time
//! from spawning QEMU to `Hello`, minus the guest's own time up to `Hello`. Every phase is
//! therefore a difference of readings of one clock, and the phases add up to the total.
//!
//! # Limitations
//! The vsock transit of `Hello` (tens of microseconds) is counted in "QEMU to kernel". The
//! guest's clock is the emulated one; under TCG it runs at the host's pace (QEMU keeps it
//! in step), but a kernel that starts counting late would shift time from "kernel to init"
//! to "QEMU to kernel". Guests that send no times leave the guest phases `None`.

use std::time::{Duration, Instant};

use matchlock_guest_proto::ReadyTimes;

/// One boot, split into phases that add up to [`BootPhases::total`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootPhases {
    /// From the start of the boot to spawning QEMU: assets, disk locks, the upper disk,
    /// sockets, services.
    pub host_prep: Duration,
    /// Starting the QEMU and vsock-helper processes (part of `qemu_to_kernel`).
    pub vm_spawn: Duration,
    /// From spawning QEMU to the guest kernel's clock starting.
    pub qemu_to_kernel: Option<Duration>,
    /// From the kernel's start to `/init` (the guest runtime) running.
    pub kernel_to_init: Option<Duration>,
    /// From `/init` starting to `Ready`: vsock dial, boot config, disks, root, agent.
    pub init_to_ready: Option<Duration>,
    /// From the start of the boot to `Ready` received.
    pub total: Duration,
}

/// Host instants noted during one boot.
#[derive(Debug, Clone, Copy)]
pub struct BootMarks {
    pub start: Instant,
    pub spawn: Instant,
    pub spawned: Instant,
    pub hello: Instant,
    pub ready: Instant,
}

impl BootPhases {
    /// The breakdown from the host's marks and the guest's times (if it sent any).
    pub fn new(m: &BootMarks, guest: Option<ReadyTimes>) -> BootPhases {
        let host_prep = m.spawn.saturating_duration_since(m.start);
        let total = m.ready.saturating_duration_since(m.start);
        let mut p = BootPhases {
            host_prep,
            vm_spawn: m.spawned.saturating_duration_since(m.spawn),
            total,
            ..BootPhases::default()
        };
        let Some(g) = guest.filter(|g| g.init_us <= g.hello_us && g.hello_us <= g.ready_us) else {
            return p;
        };
        let us = Duration::from_micros;
        let to_hello = m.hello.saturating_duration_since(m.spawn);
        let qemu_to_kernel = to_hello.saturating_sub(us(g.hello_us));
        p.qemu_to_kernel = Some(qemu_to_kernel);
        p.kernel_to_init = Some(us(g.init_us));
        // The rest, so the phases add up exactly.
        p.init_to_ready = Some(total.saturating_sub(host_prep + qemu_to_kernel + us(g.init_us)));
        p
    }
}

/// `CLOCK_MONOTONIC` now, in microseconds (0 if unreadable).
pub fn monotonic_us() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::from(t).as_micros())
        .unwrap_or(0)
}

/// The owner process's start, noted by the CLI's `main` ([`note_process_start`]).
static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Notes "now" as the start of this process, for [`BootTrace`] (first call wins).
pub fn note_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

/// Named host instants of one boot in the order they happened, for the per-step breakdown
/// of the restored path (`matchlock-bench snapshot`). Written to the console log as one
/// `matchlock: boot trace` line of `CLOCK_MONOTONIC` microseconds, the clock
/// [`Instant`] reads on Linux, so another process can set the marks against its own.
#[derive(Debug, Clone, Default)]
pub struct BootTrace {
    marks: Vec<(&'static str, Instant)>,
}

/// The prefix of the console line [`BootTrace::line`] writes.
pub const TRACE_PREFIX: &str = "boot trace (CLOCK_MONOTONIC us):";

impl BootTrace {
    /// A trace that starts with the process start, if the CLI noted it.
    pub fn new() -> Self {
        let mut t = BootTrace::default();
        if let Some(p) = PROCESS_START.get() {
            t.marks.push(("process", *p));
        }
        t
    }

    /// Notes `name` now.
    pub fn mark(&mut self, name: &'static str) {
        self.at(name, Instant::now());
    }

    /// Notes `name` at `t`.
    pub fn at(&mut self, name: &'static str, t: Instant) {
        self.marks.push((name, t));
    }

    /// `boot trace (CLOCK_MONOTONIC us): name=us name=us ...`.
    pub fn line(&self) -> String {
        let now = Instant::now();
        let mono = monotonic_us();
        let mut s = TRACE_PREFIX.to_owned();
        for (name, t) in &self.marks {
            let back = now.saturating_duration_since(*t).as_micros();
            s.push_str(&format!(" {name}={}", mono.saturating_sub(back)));
        }
        s
    }

    /// Parses a [`BootTrace::line`] (anywhere in `text`, the last one wins) into
    /// (name, CLOCK_MONOTONIC us) pairs.
    pub fn parse(text: &str) -> Vec<(String, u128)> {
        let Some(line) = text.lines().rev().find(|l| l.contains(TRACE_PREFIX)) else {
            return Vec::new();
        };
        let rest = line.split(TRACE_PREFIX).nth(1).unwrap_or_default();
        rest.split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_tie_clocks_at_hello() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let m = BootMarks {
            start,
            spawn: start + ms(30),
            spawned: start + ms(40),
            hello: start + ms(530),
            ready: start + ms(600),
        };
        // The guest's kernel clock started 100 ms after QEMU was spawned.
        let g = ReadyTimes {
            init_us: 250_000,
            hello_us: 400_000,
            ready_us: 470_000,
        };
        let p = BootPhases::new(&m, Some(g));
        assert_eq!(p.host_prep, ms(30));
        assert_eq!(p.vm_spawn, ms(10));
        assert_eq!(p.qemu_to_kernel, Some(ms(100)));
        assert_eq!(p.kernel_to_init, Some(ms(250)));
        assert_eq!(p.init_to_ready, Some(ms(220)));
        assert_eq!(p.total, ms(600));
        // No (or inconsistent) guest times: host phases only.
        let p = BootPhases::new(&m, None);
        assert_eq!((p.qemu_to_kernel, p.total), (None, ms(600)));
        let bad = ReadyTimes {
            init_us: 5,
            hello_us: 4,
            ready_us: 6,
        };
        assert_eq!(BootPhases::new(&m, Some(bad)).init_to_ready, None);
    }

    #[test]
    fn trace_round_trips_through_its_line() {
        let mut t = BootTrace::default();
        // Marks in the past, as a boot's are when the line is written.
        let start = Instant::now()
            .checked_sub(Duration::from_millis(20))
            .expect("uptime above 20 ms");
        t.at("a", start);
        t.at("b", start + Duration::from_millis(7));
        let parsed = BootTrace::parse(&format!("noise\nmatchlock: {}\n", t.line()));
        let names: Vec<&str> = parsed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let gap = parsed[1].1 - parsed[0].1;
        assert!((6_999..=7_001).contains(&gap), "{gap}");
        assert!(BootTrace::parse("nothing here").is_empty());
    }
}
