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
}
