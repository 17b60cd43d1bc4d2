//! `vsock-probe <cid> <port> [request-file]`: a vsock client for end-to-end tests, run as a
//! command *inside* a guest to check what an unprivileged (or privileged) process can reach.
//!
//! It opens an `AF_VSOCK` stream socket, connects to `cid:port`, sends the bytes of
//! `request-file` (e.g. an encoded agent `Exec` frame) and copies whatever comes back, until
//! the peer closes, to stdout. Every step is reported on its own line so tests can tell where it
//! stopped:
//! `socket: <error>` (exit 2), `connect: <error>` (exit 3), `connected`, `reply: <n> bytes`
//! followed by the raw reply, or `read: <error>`.
//!
//! # Design
//! The standard library only (plus two libc calls declared here), so the file also builds
//! with a bare `rustc -C target-feature=+crt-static` into a static binary that runs in the
//! busybox test image, which has no libc; see `matchlock_test_support::vsock_probe_binary`.
//!
//! # Limitations
//! Linux only; `sockaddr_vm` is laid out by hand (it is fixed by the kernel ABI).

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
/// Largest reply copied to stdout.
const MAX_REPLY: u64 = 1 << 20;

/// `struct sockaddr_vm` from `linux/vm_sockets.h`.
#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
}

fn open_and_connect(cid: u32, port: u32) -> Result<File, (&'static str, io::Error)> {
    // SAFETY: socket takes integers only.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(("socket", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    };
    // SAFETY: `addr` is a live, fully initialised sockaddr_vm of the length passed.
    let ret = unsafe { connect(fd, &addr, std::mem::size_of::<SockaddrVm>() as u32) };
    if ret < 0 {
        return Err(("connect", io::Error::last_os_error()));
    }
    Ok(File::from(owned))
}

fn exchange(conn: &mut File, request: &[u8]) -> io::Result<Vec<u8>> {
    conn.write_all(request)?;
    let mut reply = Vec::new();
    conn.take(MAX_REPLY).read_to_end(&mut reply)?;
    Ok(reply)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, cid, port, rest @ ..] if rest.len() <= 1 => {
            cid.parse::<u32>().ok().zip(port.parse::<u32>().ok())
        }
        _ => None,
    };
    let Some((cid, port)) = parsed else {
        eprintln!("usage: vsock-probe <cid> <port> [request-file]");
        return ExitCode::from(64);
    };
    let request = match args.get(3).map(std::fs::read).transpose() {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            eprintln!("vsock-probe: reading the request: {e}");
            return ExitCode::from(66);
        }
    };
    let mut conn = match open_and_connect(cid, port) {
        Ok(c) => c,
        Err((step, e)) => {
            println!("{step}: {e}");
            return ExitCode::from(if step == "socket" { 2 } else { 3 });
        }
    };
    println!("connected");
    match exchange(&mut conn, &request) {
        Ok(reply) => {
            println!("reply: {} bytes", reply.len());
            let mut out = io::stdout();
            let _ = out.write_all(&reply);
            let _ = out.write_all(b"\n");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("read: {e}");
            ExitCode::from(4)
        }
    }
}
