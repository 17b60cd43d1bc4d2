//! Reused threads for the agent's per-connection work (sessions, exec host readers, and
//! the host channel's per-stream pumps, `hostchan.rs`).
//!
//! # Design
//! Under TCG a thread start is emulated work (a 2 MiB stack mapping and its guard page,
//! `clone`, the first-touch faults of the new stack), and every exec paid it four times: its
//! session thread, its host-reader thread and the two pumps of its mux stream (issue 11). A finished job parks its thread for
//! [`IDLE_KEEP`]; a new job goes to a parked thread if one is free, else a new thread starts
//! for it. So a burst of N concurrent connections still gets N threads, as before (no queueing
//! behind a busy worker, no deadlock between a session and its own reader), and a warm
//! agent starts none.
//!
//! # Limitations
//! No upper bound on threads (as before: the host paces itself). A parked thread keeps its
//! stack's touched pages until it retires. A job that panics ends its thread (the pool just
//! starts a new one next time). A thread keeps the name of the job it started for (a
//! `session` thread may later run an `exec-reader` job).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

/// How long an idle thread waits for the next job before it exits.
pub const IDLE_KEEP: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads parked waiting for a job.
    idle: usize,
}

/// A set of reusable threads (see the module docs).
#[derive(Default)]
pub struct Pool {
    state: Mutex<State>,
    cv: Condvar,
}

/// The agent's pool.
pub fn global() -> &'static Arc<Pool> {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    POOL.get_or_init(|| Arc::new(Pool::default()))
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `job` on a parked thread, or on a new one (named `name`) if none is free.
    pub fn run<F>(self: &Arc<Self>, name: &str, job: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let mut st = self.lock();
        if st.idle > st.jobs.len() {
            st.jobs.push_back(Box::new(job));
            drop(st);
            self.cv.notify_one();
            return Ok(());
        }
        drop(st);
        let pool = Arc::clone(self);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                job();
                pool.work();
            })
            .map(drop)
    }

    /// Takes jobs until none comes for [`IDLE_KEEP`].
    fn work(&self) {
        loop {
            let mut st = self.lock();
            st.idle += 1;
            let job = loop {
                if let Some(job) = st.jobs.pop_front() {
                    st.idle -= 1;
                    break job;
                }
                let (g, wait) = self
                    .cv
                    .wait_timeout(st, IDLE_KEEP)
                    .unwrap_or_else(PoisonError::into_inner);
                st = g;
                if wait.timed_out() && st.jobs.is_empty() {
                    st.idle -= 1;
                    return;
                }
            };
            drop(st);
            job();
        }
    }

    /// Threads parked now (tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    fn wait_idle(pool: &Pool, n: usize) {
        let start = Instant::now();
        while pool.idle() != n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "idle {}",
                pool.idle()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A finished job's thread runs the next job; concurrent jobs get their own threads
    /// (a job waiting for another never deadlocks on a busy pool).
    #[test]
    fn reuses_idle_threads_and_never_queues_behind_busy_ones() {
        let pool = Arc::new(Pool::default());
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pool.run("t", move || {
            t.send(std::thread::current().id()).expect("send")
        })
        .expect("run");
        let first = rx.recv().expect("first");
        wait_idle(&pool, 1);
        let t = tx.clone();
        pool.run("t", move || {
            t.send(std::thread::current().id()).expect("send")
        })
        .expect("run");
        assert_eq!(
            rx.recv().expect("second"),
            first,
            "the parked thread was not reused"
        );
        wait_idle(&pool, 1);

        // Job A waits for job B: B must not wait for A's thread.
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        pool.run("a", move || {
            go_rx.recv_timeout(Duration::from_secs(10)).expect("b ran");
            done_tx.send(()).expect("send");
        })
        .expect("run a");
        pool.run("b", move || go_tx.send(()).expect("send"))
            .expect("run b");
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a finished");
        wait_idle(&pool, 2);
    }
}
