//! The network benchmark's test host: `matchlock-bench net-sink BYTES`, run by the bench
//! inside the receiver's network namespace (never by hand).
//!
//! # Design
//! One process serves four TCP ports on every address of its namespace, one thread each, and
//! talks to the bench over its stdin (commands) and stdout (one line per measurement):
//! - [`CONTROL_PORT`]: each connection gets the next command line the bench wrote to stdin,
//!   then is closed. The QEMU `-netdev user` guest has no exec channel, so it polls this
//!   port for its next shell command.
//! - [`SINK_PORT`] (guest -> host): counts the bytes of each connection until EOF or BYTES,
//!   prints `recv <bytes> <nanoseconds from accept>`.
//! - [`SOURCE_PORT`] (host -> guest): writes BYTES of zeros to each connection, then
//!   closes it.
//! - [`DONE_PORT`]: the guest sends the byte count it received (`wc -c`) once its download
//!   ended; prints `sent <count> <nanoseconds from the SOURCE_PORT accept>`.
//!
//! Timing is taken here, on the host, for both directions, so the guest's emulated clock
//! plays no part.
//!
//! # Limitations
//! Connections are served one at a time per port (the bench runs one transfer at a time).
//! The host -> guest time ends when the guest's count report arrives: it includes `wc`
//! finishing and one small segment on the report connection (opened when the guest's
//! pipeline started), the same on both sides of the comparison.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Control connections: the next guest command.
pub const CONTROL_PORT: u16 = 5200;
/// Guest -> host bulk data.
pub const SINK_PORT: u16 = 5201;
/// Host -> guest bulk data.
pub const SOURCE_PORT: u16 = 5202;
/// The guest's "received N bytes" report after a download.
pub const DONE_PORT: u16 = 5203;

const CHUNK: usize = 64 * 1024;
/// Longest wait for a download's count report (the bench gives up on a transfer sooner).
const DONE_TIMEOUT: Duration = Duration::from_secs(600);

/// Entry point of `matchlock-bench net-sink BYTES`.
pub fn main(bytes: u64) -> anyhow::Result<()> {
    let listen = |port: u16| {
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind port {port}"))
    };
    let (control, sink, source, done) = (
        listen(CONTROL_PORT)?,
        listen(SINK_PORT)?,
        listen(SOURCE_PORT)?,
        listen(DONE_PORT)?,
    );
    let (cmd_tx, cmd_rx) = mpsc::channel::<String>();
    let (start_tx, start_rx) = mpsc::channel::<Instant>();
    std::thread::spawn(move || serve_control(control, cmd_rx));
    std::thread::spawn(move || serve_sink(sink, bytes));
    std::thread::spawn(move || serve_source(source, bytes, start_tx));
    std::thread::spawn(move || serve_done(done, start_rx));
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.context("read a command")?;
        if cmd_tx.send(line).is_err() {
            break;
        }
    }
    Ok(())
}

fn serve_control(l: TcpListener, cmds: mpsc::Receiver<String>) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let Ok(cmd) = cmds.recv() else { return };
        let _ = c.write_all(format!("{cmd}\n").as_bytes());
        let _ = c.shutdown(Shutdown::Both);
    }
}

fn serve_sink(l: TcpListener, limit: u64) {
    let mut buf = vec![0u8; CHUNK];
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let t = Instant::now();
        let mut got = 0u64;
        while got < limit {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        println!("recv {got} {}", t.elapsed().as_nanos());
    }
}

fn serve_source(l: TcpListener, bytes: u64, starts: mpsc::Sender<Instant>) {
    let buf = vec![0u8; CHUNK];
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = starts.send(Instant::now());
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            if c.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = c.shutdown(Shutdown::Write);
    }
}

fn serve_done(l: TcpListener, starts: mpsc::Receiver<Instant>) {
    for conn in l.incoming() {
        let Ok(c) = conn else { continue };
        // The guest's `nc` connects when its pipeline starts and sends the count when the
        // download is over, so this wait spans the whole transfer.
        let _ = c.set_read_timeout(Some(DONE_TIMEOUT));
        let mut text = String::new();
        let _ = c.take(64).read_to_string(&mut text);
        let end = Instant::now();
        // The latest download's start (earlier ones, if any, were abandoned).
        let Some(start) = starts.try_iter().last() else {
            println!("sent ? 0");
            continue;
        };
        match text.trim().parse::<u64>() {
            Ok(count) => println!("sent {count} {}", (end - start).as_nanos()),
            Err(_) => println!("sent ? 0 (report {:?})", text.trim()),
        }
    }
}
