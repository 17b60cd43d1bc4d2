//! Spawning VM helper processes that die with their owner, and supervising them.
//!
//! # Design
//! - Children get stdin from `/dev/null`, their own process group (so a terminal Ctrl-C
//!   reaches only the owner, which decides how to stop the VM) and `PR_SET_PDEATHSIG(SIGKILL)`
//!   (so `kill -9` of the owner leaves no orphaned QEMU). Setting the death signal needs a
//!   `pre_exec` hook, the only `unsafe` in this crate. The same hook confines the child with
//!   a Landlock ruleset built by the owner (see `confine`): `no_new_privs`, then
//!   `landlock_restrict_self` on the ruleset fd, two syscalls and no allocation.
//! - The death signal fires when the *thread* that forked the child exits, not the process.
//!   Callers may start VMs from short-lived threads (tokio's blocking pool), so every child
//!   is forked by one dedicated spawner thread that lives as long as the process.
//! - Each child has a waiter thread. It blocks in `waitid(WEXITED | WNOWAIT)`, which reports
//!   the exit without reaping, then reaps under the same lock [`Supervised::signal`] takes before
//!   signalling: a pid is therefore never signalled after it was reaped (and possibly reused).
//!
//! # Limitations
//! If the spawner thread cannot be created, children are forked from the calling thread
//! (logged): they then die with that thread. Grandchildren are not tracked (neither QEMU nor
//! `vhost-device-vsock` forks), but `kill` signals the whole process group anyway.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

type SpawnJob = (Command, mpsc::SyncSender<io::Result<Child>>);

/// The kernel's Landlock ABI version, `None` if it has no Landlock (or it is disabled).
pub(crate) fn landlock_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    #[allow(unsafe_code)]
    // SAFETY: landlock_create_ruleset with a null attribute pointer, size 0 and the VERSION
    // flag only returns the ABI version (or -1); it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// Spawns `cmd` (stdin null, own process group, SIGKILL on owner death, confined by the
/// Landlock ruleset `landlock` if given) from the process-wide spawner thread.
pub(crate) fn spawn_tied(mut cmd: Command, landlock: Option<OwnedFd>) -> io::Result<Child> {
    cmd.stdin(Stdio::null()).process_group(0);
    let owner = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (prctl, getppid, landlock_restrict_self) on values it owns;
    // it allocates nothing and touches no locks. The ruleset fd stays open until the
    // closure is dropped with `cmd` in the parent, after the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The owner may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != owner.as_raw() {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(fd) = &landlock {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    match spawner() {
        Some(tx) => {
            let (reply_tx, reply_rx) = mpsc::sync_channel(1);
            let sent = tx
                .lock()
                .map_err(|_| io::Error::other("spawner lock poisoned"))?
                .send((cmd, reply_tx));
            match sent {
                Ok(()) => reply_rx
                    .recv()
                    .map_err(|_| io::Error::other("spawner thread is gone"))?,
                Err(mpsc::SendError((mut cmd, _))) => {
                    tracing::warn!("spawner thread is gone; spawning from the calling thread");
                    cmd.spawn()
                }
            }
        }
        None => cmd.spawn(),
    }
}

fn spawner() -> Option<&'static Mutex<mpsc::Sender<SpawnJob>>> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnJob>>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            let started = thread::Builder::new()
                .name("matchlock-vm-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                });
            match started {
                Ok(_) => Some(Mutex::new(tx)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start spawner thread; children will die with their spawning thread");
                    None
                }
            }
        })
        .as_ref()
}

struct State {
    child: Child,
    status: Option<String>,
}

/// A child process with a waiter thread that reaps it.
pub(crate) struct Supervised {
    what: &'static str,
    pid: u32,
    state: Mutex<State>,
    exited: Condvar,
}

impl Supervised {
    /// Starts the waiter thread; `on_exit` runs on it right after the child is reaped.
    pub(crate) fn new(
        what: &'static str,
        child: Child,
        on_exit: Option<Box<dyn FnOnce() + Send>>,
    ) -> io::Result<Arc<Self>> {
        let pid = child.id();
        let me = Arc::new(Supervised {
            what,
            pid,
            state: Mutex::new(State {
                child,
                status: None,
            }),
            exited: Condvar::new(),
        });
        let waiter = Arc::clone(&me);
        let spawned = thread::Builder::new()
            .name(format!("wait-{what}-{pid}"))
            .spawn(move || {
                waiter.wait_and_reap();
                if let Some(f) = on_exit {
                    f();
                }
            });
        if let Err(e) = spawned {
            // Without a waiter nobody would reap it: do not leave it running.
            let _ = me.signal();
            if let Ok(mut st) = me.state.lock() {
                let _ = st.child.wait();
            }
            return Err(e);
        }
        Ok(me)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn wait_and_reap(&self) {
        let Ok(raw) = i32::try_from(self.pid) else {
            return;
        };
        while let Err(nix::errno::Errno::EINTR) = waitid(
            Id::Pid(Pid::from_raw(raw)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {}
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let status = match st.child.wait() {
            Ok(s) => describe(s),
            Err(e) => format!("unknown exit ({e})"),
        };
        tracing::debug!(what = self.what, pid = self.pid, %status, "child exited");
        st.status = Some(status);
        self.exited.notify_all();
    }

    /// `Some(description)` once the child has exited and been reaped.
    pub(crate) fn status(&self) -> Option<String> {
        match self.state.lock() {
            Ok(st) => st.status.clone(),
            Err(p) => p.into_inner().status.clone(),
        }
    }

    /// Waits up to `timeout` for the child to be reaped; true if it was.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while st.status.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.exited.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// SIGKILLs the child's process group unless it was already reaped. Returns without
    /// waiting.
    pub(crate) fn signal(&self) -> Result<(), nix::Error> {
        let st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if st.status.is_some() {
            return Ok(());
        }
        let Ok(raw) = i32::try_from(self.pid) else {
            return Ok(());
        };
        // Holding the lock: the waiter cannot reap in between, so the pid is still ours.
        match killpg(Pid::from_raw(raw), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn what(&self) -> &'static str {
        self.what
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(name) => format!("killed by {name}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervised_child_is_reaped_and_killable() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = spawn_tied(cmd, None).expect("spawn sleep");
        let (tx, rx) = mpsc::channel();
        let sup = Supervised::new(
            "sleep",
            child,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        )
        .expect("supervise");
        assert!(sup.status().is_none());
        assert!(!sup.wait(Duration::from_millis(50)));
        // Its own process group.
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(sup.pid() as i32))).expect("pgid");
        assert_eq!(pgid.as_raw() as u32, sup.pid());
        sup.signal().expect("kill");
        assert!(sup.wait(Duration::from_secs(5)));
        assert_eq!(sup.status().as_deref(), Some("killed by SIGKILL"));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("on_exit ran");
        // Idempotent after reaping.
        sup.signal().expect("kill again");
    }

    #[test]
    fn exit_code_is_reported() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let sup = Supervised::new("sh", spawn_tied(cmd, None).expect("spawn"), None).expect("sup");
        assert!(sup.wait(Duration::from_secs(5)));
        assert_eq!(sup.status().as_deref(), Some("exit code 3"));
    }
}
