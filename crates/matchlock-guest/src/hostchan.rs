//! The guest end of the virtio-serial host channel (selected by `matchlock.chan=serial` on
//! the kernel command line; vsock otherwise).
//!
//! # Design
//! - PID 1 opens the port named [`PORT_NAME`] (found through
//!   `/sys/class/virtio-ports/*/name`) before anything else runs, then unlinks its device
//!   node. virtio-serial allows one opener per port (a second `open` fails with `EBUSY`), and
//!   PID 1 never closes it, so no user command, root included, can open it: even one that
//!   recreates the node with `mknod` gets `EBUSY`. The descriptor is close-on-exec.
//! - A thread runs [`Mux`] sessions over the port for the life of the VM: a read of EOF means
//!   the host end is not connected (right after boot or after a restore, before the owner
//!   connects) or went away; the agent then waits and serves the next connection instead of
//!   exiting. Streams are reset when a session that carried frames ends.
//! - Streams opened by the host to [`SERVICE_PORT`] reach the agent as `UnixStream` halves
//!   ([`crate::conn::Conn`]); the boot handshake opens [`READY_PORT`] toward the host.
//!
//! # Limitations
//! Polls every [`RECONNECT_POLL`] while the host is not connected (a virtio-serial port reads
//! EOF immediately then; `poll` reports `POLLHUP` continuously).

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use matchlock_guest_proto::mux::{Mux, MuxRole, PORT_NAME};
#[cfg(doc)]
use matchlock_guest_proto::{READY_PORT, SERVICE_PORT};

/// How long to wait for the port's device to appear at boot.
const PORT_WAIT: Duration = Duration::from_secs(5);
/// Pause between sessions while the host end is not connected.
pub const RECONNECT_POLL: Duration = Duration::from_millis(20);
/// The kernel command-line word that selects this channel.
const CMDLINE_WORD: &str = "matchlock.chan=serial";

#[derive(Debug, thiserror::Error)]
pub enum HostChanError {
    #[error("virtio-serial port {PORT_NAME:?} not found within {PORT_WAIT:?}")]
    PortMissing,
    #[error("open the host channel port {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("duplicate the host channel descriptor")]
    Clone(#[source] io::Error),
    #[error("start the host channel thread")]
    Thread(#[source] io::Error),
}

/// Whether the kernel command line selects the virtio-serial channel.
pub fn selected(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == CMDLINE_WORD)
}

/// `/dev/<node>` of the port named [`PORT_NAME`], if it exists yet.
fn find_port(sys: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys).ok()?;
    entries.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim_end() == PORT_NAME).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Opens the port exclusively and unlinks its node (see the module docs).
fn open_port() -> Result<File, HostChanError> {
    let start = Instant::now();
    let path = loop {
        match find_port(Path::new("/sys/class/virtio-ports")) {
            Some(p) if p.exists() => break p,
            _ if start.elapsed() >= PORT_WAIT => return Err(HostChanError::PortMissing),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| HostChanError::Open {
            path: path.clone(),
            source,
        })?;
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "unlinking the host channel node failed");
    }
    Ok(file)
}

/// Opens the port and serves the channel on a thread for the life of the VM.
pub fn start() -> Result<Mux, HostChanError> {
    let port = open_port()?;
    // Stream pumps on the agent's reused threads (two per exec otherwise: issue 11).
    let mux = Mux::with_spawner(
        MuxRole::Guest,
        "guest",
        None,
        Box::new(|name, job| crate::pool::global().run(name, job)),
    );
    let m = mux.clone();
    std::thread::Builder::new()
        .name("host-chan".into())
        .spawn(move || serve(&port, &m))
        .map_err(HostChanError::Thread)?;
    Ok(mux)
}

fn serve(port: &File, mux: &Mux) {
    let opened = Instant::now();
    // Sessions that read EOF before any frame: the host end was not connected.
    let mut empty = 0u64;
    loop {
        let (reader, writer) = match port.try_clone().and_then(|r| Ok((r, port.try_clone()?))) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %HostChanError::Clone(e), "host channel");
                std::thread::sleep(RECONNECT_POLL);
                continue;
            }
        };
        match mux.run_session(reader, Box::new(writer)) {
            Ok(0) => {
                empty += 1;
                if empty == 1 {
                    let ms = opened.elapsed().as_millis();
                    tracing::info!(ms, "host channel not connected yet; polling");
                }
            }
            Ok(frames) => {
                tracing::info!(frames, empty, "host channel session ended");
                empty = 0;
            }
            Err(e) => tracing::warn!(error = %crate::chain(&e), "host channel session ended"),
        }
        std::thread::sleep(RECONNECT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_and_port_lookup() {
        assert!(selected("console=ttyS0 matchlock.chan=serial init=/init"));
        assert!(!selected("console=ttyS0 matchlock.chan=serialx"));
        let dir = tempfile::tempdir().expect("tempdir");
        for (node, name) in [("vport0p1", "other\n"), ("vport0p2", "matchlock.0\n")] {
            std::fs::create_dir(dir.path().join(node)).expect("mkdir");
            std::fs::write(dir.path().join(node).join("name"), name).expect("name");
        }
        assert_eq!(find_port(dir.path()), Some(PathBuf::from("/dev/vport0p2")));
        assert_eq!(find_port(&dir.path().join("missing")), None);
    }
}
