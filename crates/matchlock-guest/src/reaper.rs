//! The central child reaper: one thread owns `wait`, everybody else asks it.
//!
//! # Design
//! As PID 1 we inherit every orphan, so exactly one thread may call `wait*` (a second waiter,
//! such as `std::process::Child::wait`, would steal statuses). Spawners call
//! [`Reaper::spawn`], which runs the fork **while holding the registry lock** and registers
//! the pid before releasing it. The reaper thread blocks in `waitid(P_ALL, WEXITED|WNOWAIT)`,
//! then takes the lock before reaping, so a child that dies instantly is still delivered to
//! its spawner (the race "reaped before registered" cannot happen); pids nobody registered
//! are orphans and their status is dropped.
//!
//! Peeking with `WNOWAIT` first also lets the reaper SIGKILL the process group of a finished
//! command while its leader is still a zombie: the zombie pins the pid, so the group id
//! cannot have been reused by an unrelated new session.
//!
//! When there are no children at all, `waitid` fails with `ECHILD`; the thread then sleeps on
//! a condition variable that [`Reaper::spawn`] notifies (with a short timeout as a backstop for
//! orphans re-parented to us while we had none).
//!
//! # Limitations
//! One reaper per process (global); every child of this process must be spawned through it.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
#[cfg(test)]
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::sys;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Shell convention: the exit code, or 128+n when killed by signal n.
    pub fn to_status(self) -> matchlock_guest_proto::ExitStatus {
        match self {
            Exit::Code(code) => matchlock_guest_proto::ExitStatus { code, signal: None },
            Exit::Signal(n) => matchlock_guest_proto::ExitStatus {
                code: 128 + n,
                signal: Some(n),
            },
        }
    }
}

struct Waiter {
    tx: Sender<Exit>,
    /// SIGKILL the pid's process group before reaping it.
    kill_group: bool,
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, Waiter>,
    spawned: u64,
}

/// The process-wide reaper.
pub struct Reaper {
    reg: Mutex<Registry>,
    wake: Condvar,
}

static REAPER: OnceLock<&'static Reaper> = OnceLock::new();

/// The global reaper, starting its thread on first use.
pub fn global() -> &'static Reaper {
    REAPER.get_or_init(|| {
        let r: &'static Reaper = Box::leak(Box::new(Reaper {
            reg: Mutex::new(Registry::default()),
            wake: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper thread");
        }
        r
    })
}

impl Reaper {
    /// Spawns `cmd` and registers it; the returned receiver yields its exit exactly once.
    /// With `kill_group`, whatever is left in the child's process group is SIGKILLed when the
    /// child itself exits (the child must lead its own group, e.g. via `setsid`).
    #[cfg(test)]
    pub fn spawn(&self, cmd: &mut Command, kill_group: bool) -> io::Result<(i32, Receiver<Exit>)> {
        self.spawn_with(
            || {
                let child = cmd.spawn()?;
                // Dropping `Child` neither waits nor kills; the reaper owns the status.
                Ok(i32::try_from(child.id()).unwrap_or(i32::MAX))
            },
            kill_group,
        )
    }

    /// Like [`Reaper::spawn`], for a child started by `start` (which returns its pid).
    pub fn spawn_with(
        &self,
        start: impl FnOnce() -> io::Result<i32>,
        kill_group: bool,
    ) -> io::Result<(i32, Receiver<Exit>)> {
        let (tx, rx) = mpsc::channel();
        let mut reg = self.reg.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = start()?;
        reg.waiters.insert(pid, Waiter { tx, kill_group });
        reg.spawned += 1;
        drop(reg);
        self.wake.notify_all();
        Ok((pid, rx))
    }

    fn run(&self) {
        loop {
            // Read before waiting: a spawn between ECHILD and the sleep below must not be missed.
            let seen = self
                .reg
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .spawned;
            match sys::wait_any_exited() {
                Ok(pid) if pid > 0 => self.reap(pid),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let reg = self.reg.lock().unwrap_or_else(PoisonError::into_inner);
                    let _unused = self
                        .wake
                        .wait_timeout_while(reg, Duration::from_millis(200), |r| r.spawned == seen)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waitid failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn reap(&self, pid: i32) {
        let mut reg = self.reg.lock().unwrap_or_else(PoisonError::into_inner);
        let waiter = reg.waiters.remove(&pid);
        drop(reg);
        if let Some(w) = &waiter {
            if w.kill_group {
                // The leader is a zombie, so its pid (= pgid) cannot be reused yet.
                let _ = sys::kill_group(pid, libc::SIGKILL);
            }
        }
        let exit = match sys::reap(pid) {
            Ok(Some(status)) => match decode_status(status) {
                Some(exit) => exit,
                None => {
                    tracing::debug!(pid, status, "unexpected wait status");
                    return;
                }
            },
            Ok(None) => {
                tracing::warn!(pid, "exited child vanished before reaping");
                return;
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "waitpid failed");
                return;
            }
        };
        match waiter {
            Some(w) => {
                let _ = w.tx.send(exit);
            }
            None => tracing::debug!(%pid, ?exit, "reaped orphan"),
        }
    }
}

/// Exit code or terminating signal of a raw wait status.
fn decode_status(status: i32) -> Option<Exit> {
    if libc::WIFEXITED(status) {
        Some(Exit::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(Exit::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_decoding() {
        assert_eq!(decode_status(42 << 8), Some(Exit::Code(42)));
        assert_eq!(decode_status(9), Some(Exit::Signal(9)));
        // Real-time signal 40, which `nix` cannot represent.
        assert_eq!(decode_status(40), Some(Exit::Signal(40)));
        assert_eq!(decode_status(0x137f), None); // stopped by SIGSTOP
    }

    #[test]
    fn exit_mapping() {
        assert_eq!(Exit::Code(42).to_status().code, 42);
        assert_eq!(Exit::Code(0).to_status().signal, None);
        let s = Exit::Signal(9).to_status();
        assert_eq!((s.code, s.signal), (137, Some(9)));
        assert_eq!(Exit::Signal(15).to_status().code, 143);
    }

    #[test]
    fn instant_exit_is_delivered() {
        // `true` usually exits before the spawner could register it without the lock.
        for _ in 0..20 {
            let (_, rx) = global()
                .spawn(&mut Command::new("true"), false)
                .expect("spawn");
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(10)).expect("exit"),
                Exit::Code(0)
            );
        }
        let (_, rx) = global()
            .spawn(Command::new("sh").args(["-c", "exit 3"]), false)
            .expect("spawn");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).expect("exit"),
            Exit::Code(3)
        );
    }
}
