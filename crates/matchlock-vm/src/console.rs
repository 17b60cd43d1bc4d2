//! The VM's console log: the guest serial console and the stderr of QEMU and its helper,
//! written by the owner, capped and rotated.
//!
//! # Design
//! QEMU's serial port is a `stdio` chardev whose stdout is a pipe to the owner (QEMU's and
//! `vhost-device-vsock`'s stderr share the pipe), and one thread copies the pipe into the
//! log. So a guest that floods its console costs the host at most
//! `2 x max_bytes` of disk (`vm.log` and one rotated `vm.log.1`), and a slow disk slows the
//! guest's serial port rather than growing memory. Other writers of the same log (command
//! output that `run` copies there, a launched entrypoint) go through [`ConsoleLog::writer`]
//! so they are capped and rotated with it.
//!
//! # Limitations
//! Rotation keeps one older file; what is rotated out of `vm.log.1` is gone. Readers that
//! follow the log by offset (`log -f`, `log_stream`) restart from the top of the new file
//! after a rotation and may miss what was written between their last read and the rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default cap of `vm.log` (the rotated copy holds as much again).
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 16 << 20;
/// Environment variable overriding [`DEFAULT_CONSOLE_MAX_BYTES`] (bytes, at least 4096).
pub const CONSOLE_MAX_ENV: &str = "MATCHLOCK_LOG_MAX_BYTES";

/// The cap from [`CONSOLE_MAX_ENV`], or the default (also for unparsable or tiny values,
/// with a warning).
pub fn console_max_bytes() -> u64 {
    match std::env::var(CONSOLE_MAX_ENV) {
        Err(_) => DEFAULT_CONSOLE_MAX_BYTES,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 4096 => n,
            _ => {
                tracing::warn!(value = %v, "{CONSOLE_MAX_ENV} must be a byte count >= 4096; using the default");
                DEFAULT_CONSOLE_MAX_BYTES
            }
        },
    }
}

/// The path of the rotated copy of `path` (`vm.log.1`).
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

struct Current {
    file: Option<File>,
    size: u64,
}

/// A capped, rotating log file shared by several writers.
pub struct ConsoleLog {
    path: PathBuf,
    max_bytes: u64,
    current: Mutex<Current>,
    drained: AtomicBool,
}

fn open_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // Also when an older file was looser.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

impl ConsoleLog {
    /// Starts an empty log at `path` (0600), removing a rotated copy from an earlier run.
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Arc<ConsoleLog>> {
        let file = open_private(path)?;
        let _ = fs::remove_file(rotated_path(path));
        Ok(Arc::new(ConsoleLog {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            current: Mutex::new(Current {
                file: Some(file),
                size: 0,
            }),
            drained: AtomicBool::new(false),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends `buf`, rotating whenever the file reaches the cap (so it never exceeds it).
    /// Best effort: a failing disk loses log lines, never blocks or fails the writer.
    pub fn append(&self, mut buf: &[u8]) {
        let mut cur = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while !buf.is_empty() {
            if cur.size >= self.max_bytes {
                self.rotate(&mut cur);
            }
            let room = usize::try_from(self.max_bytes - cur.size).unwrap_or(usize::MAX);
            let n = buf.len().min(room);
            let ok = match cur.file.as_mut() {
                Some(f) => f.write_all(&buf[..n]).is_ok(),
                None => false,
            };
            if !ok {
                return;
            }
            cur.size += n as u64;
            buf = &buf[n..];
        }
    }

    fn rotate(&self, cur: &mut Current) {
        cur.file = None;
        if let Err(e) = fs::rename(&self.path, rotated_path(&self.path)) {
            tracing::warn!(path = %self.path.display(), error = %e, "rotating the console log");
        }
        match open_private(&self.path) {
            Ok(f) => {
                cur.file = Some(f);
                cur.size = 0;
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "reopening the console log")
            }
        }
    }

    /// A writer appending to this log.
    pub fn writer(self: &Arc<Self>) -> ConsoleWriter {
        ConsoleWriter(self.clone())
    }

    /// Copies `pipe` into the log on a thread until every writer of the pipe has closed it.
    pub fn pump(self: &Arc<Self>, mut pipe: io::PipeReader) -> io::Result<()> {
        let log = self.clone();
        std::thread::Builder::new()
            .name("console-log".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => log.append(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                log.drained.store(true, Ordering::SeqCst);
            })
            .map(|_| ())
    }

    /// Waits up to `timeout` until the pipe has been copied to its end (the VM and its
    /// helper have exited); true if it has.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.drained.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// `io::Write` into a [`ConsoleLog`]; never fails.
#[derive(Clone)]
pub struct ConsoleWriter(Arc<ConsoleLog>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_and_rotated() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vm.log");
        std::fs::write(rotated_path(&path), b"old run").expect("stale");
        let log = ConsoleLog::create(&path, 10).expect("create");
        assert!(!rotated_path(&path).exists(), "a new log starts fresh");
        let mut w = log.writer();
        w.write_all(b"0123456").expect("w");
        w.write_all(b"789abcdef").expect("w");
        assert_eq!(
            std::fs::read(rotated_path(&path)).expect("rotated"),
            b"0123456789"
        );
        assert_eq!(std::fs::read(&path).expect("current"), b"abcdef");
        // One write far larger than the cap never leaves a file above it.
        log.append(&[b'x'; 35]);
        assert!(std::fs::metadata(&path).expect("m").len() <= 10);
        assert!(std::fs::metadata(rotated_path(&path)).expect("m").len() <= 10);
        let mode = std::fs::metadata(&path).expect("m").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn pump_copies_until_every_writer_closes() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vm.log");
        let log = ConsoleLog::create(&path, 1 << 20).expect("create");
        let (r, mut w) = io::pipe().expect("pipe");
        let mut w2 = w.try_clone().expect("clone");
        log.pump(r).expect("pump");
        w.write_all(b"serial ").expect("w");
        w2.write_all(b"stderr").expect("w");
        drop(w);
        assert!(
            !log.wait_drained(Duration::from_millis(50)),
            "one writer still open"
        );
        drop(w2);
        assert!(log.wait_drained(Duration::from_secs(5)));
        assert_eq!(std::fs::read(&path).expect("read"), b"serial stderr");
    }
}
