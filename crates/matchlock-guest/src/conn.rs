//! The byte stream a session runs over.
//!
//! # Design
//! Sessions are generic over [`Conn`] so the same code runs over vsock in the VM and over
//! `UnixStream::pair()` in host-side tests. A session needs independent handles for its
//! reader and writer threads (`try_clone`) and half-close (`shutdown`).
//!
//! # Limitations
//! Only the two stream types we use implement it.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

/// A bidirectional stream that can be cloned and half-closed.
pub trait Conn: Read + Write + Send + Sized + 'static {
    fn try_clone_conn(&self) -> io::Result<Self>;
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()>;
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl Conn for vsock::VsockStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl Conn for std::net::TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}
