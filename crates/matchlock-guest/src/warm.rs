//! Work the first command would otherwise pay for, done in the boot's idle time.
//!
//! # Design
//! The first `exec` after boot builds the unprivileged commands' seccomp program
//! ([`crate::sys::seccomp_program`], compiled once with `seccompiler`, a few thousand emulated
//! instructions per rule under TCG). [`start`] builds it on a thread started at the beginning
//! of the boot and moved to `SCHED_IDLE`, so it runs only while the boot's own thread waits
//! (the host's boot config, virtio-blk reads of the image, mounts) and never takes the vCPU
//! from it; an `exec` that arrives before it finished waits on the same `OnceLock` instead
//! of building the program a second time.
//!
//! # Limitations
//! Only the seccomp program is warmed: the first command's binary is not known before it
//! arrives, so its pages (squashfs reads and decompression) are still paid on first use.
//! If `SCHED_IDLE` cannot be set the thread warms at normal priority (logged).

use std::thread::JoinHandle;
use std::time::Instant;

/// Starts the warm-up thread; the handle is for tests (the boot does not wait for it).
pub fn start() -> std::io::Result<JoinHandle<bool>> {
    std::thread::Builder::new().name("warm".into()).spawn(|| {
        if let Err(e) = crate::sys::set_thread_idle_priority() {
            tracing::warn!(error = %e, "warm-up thread keeps normal priority");
        }
        let t = Instant::now();
        match crate::sys::seccomp_program() {
            Ok(_) => {
                tracing::debug!(us = t.elapsed().as_micros(), "seccomp program built");
                true
            }
            Err(e) => {
                // The first exec reports it (it builds through the same call).
                tracing::warn!(error = %e, "building the seccomp program failed");
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn warm_thread_builds_the_seccomp_program_at_idle_priority() {
        assert!(super::start().expect("spawn").join().expect("join"));
        // Built once: the next caller gets the same program.
        assert!(!crate::sys::seccomp_program().expect("program").is_empty());
        let policy = std::thread::spawn(|| {
            crate::sys::set_thread_idle_priority().expect("SCHED_IDLE");
            crate::sys::thread_sched_policy().expect("policy")
        })
        .join()
        .expect("join");
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
