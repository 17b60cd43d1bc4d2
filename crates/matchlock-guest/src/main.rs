//! `matchlock-guest`: PID 1 of every sandbox VM.
//!
//! # Design
//! One static binary, no tokio: threads and blocking I/O keep PID 1 small and easy to
//! reason about. `init` boots (mounts, root switch, boot handshake) and then runs the
//! `agent` listener; a single `reaper` thread owns `wait`.
//!
//! # Limitations
//! Only meaningful as PID 1 inside the VM; run elsewhere it refuses to start.

mod conn;
mod etc;
mod exec;
mod reaper;
mod sys;
mod user;

fn main() {}
