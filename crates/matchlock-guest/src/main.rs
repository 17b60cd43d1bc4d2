//! `matchlock-guest`: PID 1 of every sandbox VM.
//!
//! # Design
//! One static binary, no async runtime: threads and blocking I/O keep PID 1 small and easy
//! to reason about. [`init`] boots (mounts, root switch, boot handshake) and starts the
//! [`agent`] listener; a single [`reaper`] thread owns `wait` for the whole process.
//! `unsafe` lives only in [`sys`].
//!
//! # Limitations
//! Only meaningful as PID 1 inside the VM; started as any other pid it refuses to run.

mod agent;
mod conn;
mod etc;
mod exec;
mod files;
mod forward;
mod hostchan;
mod init;
mod pool;
mod reaper;
mod resume;
mod spawn;
mod sys;
mod timer;
mod user;

use std::error::Error;

/// `err: cause: cause...`, printed once at the edge.
pub(crate) fn chain(err: &dyn Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();
    if std::process::id() != 1 {
        eprintln!("matchlock-guest: must run as PID 1 inside the sandbox VM");
        std::process::exit(2);
    }
    init::run()
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_joins_sources() {
        let inner = std::io::Error::other("disk on fire");
        let e = crate::init::BootError::OpenUpper(inner);
        assert_eq!(super::chain(&e), "opening the upper mount: disk on fire");
    }
}
