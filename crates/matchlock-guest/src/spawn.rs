//! Starting a command without copying the agent: `clone(CLONE_VM | CLONE_VFORK)`, the child
//! hardens itself in our address space, then `execve`.
//!
//! # Design
//! `std::process::Command` with a `pre_exec` hook (which the hardening needs) does a full
//! `fork`: the kernel copies the page tables of the multi-threaded agent, and until the child
//! execs every page the agent's other threads touch takes a copy-on-write fault. Under TCG
//! each of those is emulated and the exec path paid several milliseconds for it (issue 11).
//! Like glibc's `posix_spawn`, [`spawn`] instead runs the child on its own small stack in our
//! memory while the calling thread sleeps (`CLONE_VFORK`) until the child has exec'd or exited.
//!
//! Everything the child touches is prepared before the clone ([`Prepared`]): C strings,
//! pointer arrays, the candidate paths of the `PATH` search (done like `execvp`, including
//! its `/bin/sh` fallback for scripts without `#!`), the seccomp program. The child makes raw
//! syscalls only (never glibc's `setuid` family, which would signal the agent's threads), no
//! allocation, no locks, and writes the errno of a failed step into [`ChildData::errno`]
//! before `_exit(127)`; the woken parent turns it into the `io::Error` `Command::spawn` gave.
//!
//! Signals: the parent blocks every signal around the clone so no handler of ours can run on
//! the child's stack; the child resets handlers to the default (`SIGPIPE`, which the Rust
//! runtime ignores, too) and then unblocks everything, as `Command` did.
//!
//! # Limitations
//! Inherited descriptors rely on `O_CLOEXEC` (as with `Command`): every descriptor the agent
//! opens is close-on-exec. Linux only.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys::{self, ChildSetup};

/// The child's stack (it runs the hardening steps and `execve` only).
const CHILD_STACK: usize = 128 * 1024;

/// glibc `execvp`'s search path when the environment has no `PATH`.
const DEFAULT_SEARCH_PATH: &str = "/bin:/usr/bin";

/// What to run: argv, the complete environment, working directory, stdio and hardening.
pub struct SpawnSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a str,
    /// Become the child's fds 0, 1 and 2.
    pub stdio: [OwnedFd; 3],
    pub setup: ChildSetup,
}

/// The spec turned into what the child reads: no allocation happens after the clone.
struct Prepared {
    _strings: Vec<CString>,
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `/bin/sh <candidate> argv[1..]`: the `execvp` fallback for `ENOEXEC`; slot 1 is
    /// filled by the child with the candidate that failed.
    sh_argv: Vec<*const libc::c_char>,
    cwd: CString,
    groups: Vec<libc::gid_t>,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte found"))
}

/// The paths `execvp` would try for `program` with `path_var`, in order.
fn search_candidates(program: &str, path_var: Option<&str>) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![cstring(program)?]);
    }
    path_var
        .unwrap_or(DEFAULT_SEARCH_PATH)
        .split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            let mut p = Path::new(dir).join(program).into_os_string().into_vec();
            p.push(0);
            CString::from_vec_with_nul(p)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte found"))
        })
        .collect()
}

impl Prepared {
    fn new(spec: &SpawnSpec<'_>) -> io::Result<Prepared> {
        let program = spec.argv.first().map(String::as_str).unwrap_or_default();
        let candidates = search_candidates(program, spec.env.get("PATH").map(String::as_str))?;
        let mut strings = Vec::new();
        for a in spec.argv {
            strings.push(cstring(a)?);
        }
        let n_args = strings.len();
        for (k, v) in spec.env {
            strings.push(cstring(&format!("{k}={v}"))?);
        }
        strings.push(cstring("/bin/sh")?);
        let ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        let (args, rest) = ptrs.split_at(n_args);
        let (envs, sh) = rest.split_at(rest.len() - 1);
        let terminated = |v: &[*const libc::c_char]| {
            let mut out = v.to_vec();
            out.push(std::ptr::null());
            out
        };
        let mut sh_argv = vec![sh[0], std::ptr::null()];
        sh_argv.extend_from_slice(args.get(1..).unwrap_or_default());
        sh_argv.push(std::ptr::null());
        Ok(Prepared {
            argv: terminated(args),
            envp: terminated(envs),
            sh_argv,
            _strings: strings,
            candidates,
            cwd: cstring(spec.cwd)?,
            groups: spec.setup.groups.clone(),
        })
    }
}

/// What the child reads (and the one thing it writes: `errno`).
struct ChildData<'a> {
    prepared: &'a mut Prepared,
    stdio: [libc::c_int; 3],
    setup: &'a ChildSetup,
    errno: AtomicI32,
}

/// Starts the command; returns its pid once it has exec'd. Errors are those of the first
/// failing step (`chdir`, hardening, `execve`), as `Command::spawn` reported them.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<i32> {
    let mut prepared = Prepared::new(spec)?;
    let stdio = [
        spec.stdio[0].as_raw_fd(),
        spec.stdio[1].as_raw_fd(),
        spec.stdio[2].as_raw_fd(),
    ];
    let mut data = ChildData {
        prepared: &mut prepared,
        stdio,
        setup: &spec.setup,
        errno: AtomicI32::new(0),
    };
    let stack = ChildStack::new()?;
    let arg: *mut ChildData<'_> = &mut data;
    let pid = {
        let _blocked = BlockedSignals::all()?;
        // SAFETY: `child_main` only reads `data` (alive until the clone returns: with
        // CLONE_VFORK we sleep until the child has exec'd or exited) and runs on `stack`.
        unsafe {
            libc::clone(
                child_main,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                arg.cast(),
            )
        }
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    match data.errno.load(Ordering::SeqCst) {
        0 => Ok(pid),
        // The child exited with 127; the reaper collects it.
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// An mmap'd stack with a guard page at its low end.
struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: anonymous private mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base };
        // SAFETY: the first page of our own mapping.
        if unsafe { libc::mprotect(base, page_size(), libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn top(&self) -> *mut libc::c_void {
        // The mapping is page-aligned, so its end is 16-byte aligned as the ABI wants.
        self.base.cast::<u8>().wrapping_add(CHILD_STACK).cast()
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child has exec'd or exited).
        unsafe { libc::munmap(self.base, CHILD_STACK) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Blocks every signal on this thread until dropped (then restores the previous mask).
struct BlockedSignals {
    old: libc::sigset_t,
}

impl BlockedSignals {
    fn all() -> io::Result<BlockedSignals> {
        // SAFETY: sigset_t is plain data; the sig* calls write into owned sets.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(BlockedSignals { old })
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// The child: runs the steps, and on failure records errno and exits 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildData` the parent keeps alive while it sleeps in the clone.
    let data = unsafe { &mut *arg.cast::<ChildData<'_>>() };
    let errno = match child_steps(data) {
        Ok(never) => match never {},
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    };
    data.errno.store(errno, Ordering::SeqCst);
    // SAFETY: _exit ends this (single-threaded) child without running any of our code.
    unsafe { libc::_exit(127) }
}

/// The child's steps in `Command`'s order (stdio, working directory, signals) then the
/// hardening, then exec; returns only on failure.
fn child_steps(data: &mut ChildData<'_>) -> io::Result<std::convert::Infallible> {
    for (target, fd) in (0..).zip(data.stdio) {
        install_fd(fd, target)?;
    }
    // SAFETY: a NUL-terminated path prepared before the clone.
    check(unsafe { libc::chdir(data.prepared.cwd.as_ptr()) })?;
    reset_signals()?;
    sys::apply_child_setup(data.setup, &data.prepared.groups)?;
    Err(exec_candidates(data.prepared))
}

/// Makes `fd` the child's `target` (0..=2), inheritable across exec.
fn install_fd(fd: libc::c_int, target: libc::c_int) -> io::Result<()> {
    if fd == target {
        // dup2 onto itself would leave O_CLOEXEC set.
        // SAFETY: fcntl on an fd we own, integer arguments.
        return check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) });
    }
    // SAFETY: dup2 with two fds; the target is replaced atomically.
    check(unsafe { libc::dup2(fd, target) })
}

/// Handlers back to the default (ours must not run in the child), `SIGPIPE` too, and every
/// signal unblocked.
fn reset_signals() -> io::Result<()> {
    let max = libc::SIGRTMAX();
    for sig in 1..=max {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction reads/writes owned, zero-initialised structs.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                // Signals reserved by libc (e.g. for thread cancellation).
                continue;
            }
            let handled = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
            if handled || (sig == libc::SIGPIPE && old.sa_sigaction == libc::SIG_IGN) {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                check(libc::sigaction(sig, &dfl, std::ptr::null_mut()))?;
            }
        }
    }
    // SAFETY: an empty set, owned.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &none,
            std::ptr::null_mut(),
        ))
    }
}

/// `execvp`'s loop: the first candidate that execs wins; missing ones are skipped, a
/// permission error is remembered, `ENOEXEC` runs the file with `/bin/sh`.
fn exec_candidates(p: &mut Prepared) -> io::Error {
    let mut denied = false;
    for cand in &p.candidates {
        let errno = execve(cand, &p.argv, &p.envp);
        match errno {
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            libc::EACCES => denied = true,
            libc::ENOEXEC => {
                if let Some(slot) = p.sh_argv.get_mut(1) {
                    *slot = cand.as_ptr();
                }
                let sh = p.sh_argv[0];
                // SAFETY: `sh` points at the prepared "/bin/sh".
                let sh = unsafe { CStr::from_ptr(sh) };
                let e = execve(sh, &p.sh_argv, &p.envp);
                return io::Error::from_raw_os_error(if e == libc::ENOENT {
                    libc::ENOEXEC
                } else {
                    e
                });
            }
            other => return io::Error::from_raw_os_error(other),
        }
    }
    io::Error::from_raw_os_error(if denied { libc::EACCES } else { libc::ENOENT })
}

/// `execve(2)`; returns its errno (it only returns on failure).
fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> i32 {
    // SAFETY: NUL-terminated path and null-terminated pointer arrays prepared before the
    // clone and alive (the parent sleeps until we exec or exit).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_follows_path_like_execvp() {
        let c = |p: &str, path: Option<&str>| -> Vec<String> {
            search_candidates(p, path)
                .expect("candidates")
                .into_iter()
                .map(|c| c.into_string().expect("utf8"))
                .collect()
        };
        assert_eq!(c("./x", Some("/bin")), vec!["./x"]);
        assert_eq!(c("ls", Some("/a::/b")), vec!["/a/ls", "./ls", "/b/ls"]);
        assert_eq!(c("ls", None), vec!["/bin/ls", "/usr/bin/ls"]);
        assert!(search_candidates("a\0b", None).is_err());
    }
}
