//! Host process identity: liveness with PID-reuse protection, and race-free signalling.
//!
//! # Design
//! A PID alone does not name a process: once it exits the kernel may give the number to an
//! unrelated process. Every recorded PID is therefore paired with the process start time (field
//! 22 of `/proc/<pid>/stat`, clock ticks since boot); the pair is unique for the whole boot.
//! Signals go through a pidfd opened *before* the start time is checked, so the process we
//! verified is the process we signal, even if it exits and its PID is reused in between (the
//! signal then fails with ESRCH instead of hitting a stranger). Zombies count as dead: they hold
//! nothing but their PID and will never run again.
//!
//! # Limitations
//! Linux only (procfs, pidfd needs kernel >= 5.3). A `/proc` read that fails for a reason other
//! than "no such process" is treated as *alive*, because every caller uses "dead" to justify a
//! destructive action (marking crashed, deleting files, reconciling).

use std::fs;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use crate::StateError;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    state: char,
    start_time: u64,
}

impl ProcStat {
    fn is_zombie(self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the content of `/proc/<pid>/stat`. `comm` (field 2) may contain spaces and
/// parentheses, so fields are counted from the *last* `)`.
fn parse_stat(pid: u32, text: &str) -> Result<ProcStat, StateError> {
    let rest = text
        .rfind(')')
        .and_then(|i| text.get(i + 1..))
        .ok_or(StateError::ParseStat { pid })?;
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 is the state; field 22 (starttime) is 19 further on.
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or(StateError::ParseStat { pid })?;
    let start_time = fields
        .nth(18)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(StateError::ParseStat { pid })?;
    Ok(ProcStat { state, start_time })
}

/// Reads `/proc/<pid>/stat`; `Ok(None)` if there is no such process.
fn read_stat(pid: u32) -> Result<Option<ProcStat>, StateError> {
    if pid == 0 {
        return Ok(None);
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(pid, &text).map(Some),
        // ESRCH shows up when the process exits between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(3) => Ok(None),
        Err(source) => Err(StateError::ReadStartTime { pid, source }),
    }
}

/// Start time (clock ticks since boot) of the live, non-zombie process `pid`.
///
/// Record it right after spawning a process (see [`crate::Resource::Process`]) so that a later
/// reused PID is never mistaken for it.
pub fn process_start_time(pid: u32) -> Result<u64, StateError> {
    match read_stat(pid)? {
        Some(st) if !st.is_zombie() => Ok(st.start_time),
        _ => Err(StateError::ProcessGone { pid }),
    }
}

/// True if `pid` is running (not a zombie) and started at `start_time`.
pub(crate) fn is_alive(pid: u32, start_time: u64) -> bool {
    match read_stat(pid) {
        Ok(Some(st)) => !st.is_zombie() && st.start_time == start_time,
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot inspect process, assuming it is alive");
            true
        }
    }
}

/// Sends `signal` to `pid` only if it is still the process that started at `start_time`.
/// Returns `Ok(false)` if that process is gone (nothing was signalled).
pub(crate) fn signal_if_same(
    pid: u32,
    start_time: u64,
    signal: Signal,
    signal_name: &'static str,
) -> Result<bool, StateError> {
    let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(false);
    };
    let pidfd = match pidfd_open(raw, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(false),
        Err(e) => {
            return Err(StateError::Signal {
                signal: signal_name,
                pid,
                source: e.into(),
            })
        }
    };
    // The pidfd pins the process we opened; verify it is the one we recorded.
    if !is_alive(pid, start_time) {
        return Ok(false);
    }
    match pidfd_send_signal(&pidfd, signal) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(StateError::Signal {
            signal: signal_name,
            pid,
            source: e.into(),
        }),
    }
}

/// SIGTERM, for `kill`.
pub(crate) fn terminate(pid: u32, start_time: u64) -> Result<bool, StateError> {
    signal_if_same(pid, start_time, Signal::TERM, "SIGTERM")
}

/// SIGKILLs the process and waits up to `timeout` for it to be gone (or a zombie).
/// `Ok(false)` if it was already gone; an error if it survives.
pub(crate) fn kill_and_wait(
    pid: u32,
    start_time: u64,
    timeout: Duration,
) -> Result<bool, StateError> {
    if !signal_if_same(pid, start_time, Signal::KILL, "SIGKILL")? {
        return Ok(false);
    }
    let deadline = Instant::now() + timeout;
    while is_alive(pid, start_time) {
        if Instant::now() >= deadline {
            return Err(StateError::Signal {
                signal: "SIGKILL",
                pid,
                source: io::Error::new(io::ErrorKind::TimedOut, "process still alive"),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parse_stat_handles_parens_and_spaces_in_comm() {
        let mut text = String::from("42 (a) b) (c) S 1");
        for i in 5..=21 {
            text.push_str(&format!(" {i}"));
        }
        text.push_str(" 987654 0 0\n");
        let st = parse_stat(42, &text).expect("parse");
        assert_eq!(st.state, 'S');
        assert_eq!(st.start_time, 987_654);
    }

    #[test]
    fn parse_stat_rejects_truncated() {
        assert!(matches!(
            parse_stat(1, "1 (x) S 0 0"),
            Err(StateError::ParseStat { pid: 1 })
        ));
        assert!(parse_stat(1, "garbage").is_err());
    }

    #[test]
    fn own_process_is_alive_and_wrong_start_time_is_not() {
        let me = std::process::id();
        let st = process_start_time(me).expect("own start time");
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, 0));
    }

    #[test]
    fn kill_and_wait_kills_child_and_zombie_counts_as_dead() {
        let mut child = Command::new("sleep").arg("1000").spawn().expect("spawn");
        let st = process_start_time(child.id()).expect("start time");
        // Wrong start time: not signalled.
        assert!(!kill_and_wait(child.id(), st + 1, Duration::from_secs(1)).expect("no-op"));
        assert!(kill_and_wait(child.id(), st, Duration::from_secs(5)).expect("kill"));
        // Still unreaped (zombie) here, but already reported dead.
        assert!(!is_alive(child.id(), st));
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert!(!kill_and_wait(child.id(), st, Duration::from_secs(1)).expect("gone"));
    }
}
