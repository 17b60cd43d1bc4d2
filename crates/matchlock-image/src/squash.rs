//! Building the read-only squashfs rootfs by piping a tar stream into `tar2sqfs`.
//!
//! # Design
//! - `tar2sqfs` (squashfs-tools-ng) builds the image from a tar stream without root and
//!   keeps owners, modes, devices, xattrs and mtimes from the tar headers. We run it with
//!   `--no-skip` so an entry it cannot represent aborts the build instead of silently
//!   disappearing, and zstd compression (fast to decompress under TCG).
//! - The producer closure writes straight into the child's stdin; stderr is drained on a
//!   thread (bounded) so neither side can block the other.
//!
//! # Limitations
//! - Requires `tar2sqfs` on `PATH` (Debian package `squashfs-tools-ng`).

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::flatten::FlattenError;

/// Keep at most this much of the tool's stderr for the error message.
const MAX_STDERR: u64 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SquashError {
    #[error("tool not found: tar2sqfs; install squashfs-tools-ng")]
    NotFound(#[source] io::Error),
    #[error("start tar2sqfs")]
    Spawn(#[source] io::Error),
    #[error("produce tar stream")]
    Produce(#[source] FlattenError),
    #[error("wait for tar2sqfs")]
    Wait(#[source] io::Error),
    #[error("tar2sqfs failed ({status}): {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs `tar2sqfs` writing `out`, feeding it the tar stream `produce` writes.
pub(crate) fn build_squashfs(
    out: &Path,
    produce: impl FnOnce(&mut dyn Write) -> Result<(), FlattenError>,
) -> Result<(), SquashError> {
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut child = Command::new("tar2sqfs")
        .args(["--quiet", "--no-skip", "--force", "--compressor", "zstd"])
        // zstd level 3 instead of tar2sqfs' default (15): ~30x faster to build (a 24 MB
        // Debian root: 11 s -> 0.34 s) for ~15% more disk; decompression speed is the same.
        .args(["--comp-extra", "level=3"])
        .args(["--defaults", "uid=0,gid=0,mode=0755,mtime=0"])
        .args(["--num-jobs", &jobs.to_string()])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SquashError::NotFound(e)
            } else {
                SquashError::Spawn(e)
            }
        })?;
    let stderr_thread = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut s).take(MAX_STDERR).read_to_end(&mut buf);
            // Drain the rest so the tool never blocks on a full pipe.
            let _ = io::copy(&mut s, &mut io::sink());
            String::from_utf8_lossy(&buf).trim().to_owned()
        })
    });
    let produced = match child.stdin.take() {
        Some(stdin) => {
            let mut w = BufWriter::with_capacity(1 << 16, stdin);
            let r = produce(&mut w);
            drop(w);
            r
        }
        None => Ok(()),
    };
    let status = child.wait().map_err(SquashError::Wait)?;
    let stderr = stderr_thread
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    match produced {
        // A broken pipe only means the tool gave up first: its own error says why.
        Err(e) if status.success() || !is_broken_pipe(&e) => Err(SquashError::Produce(e)),
        _ if !status.success() => Err(SquashError::Failed { status, stderr }),
        r => r.map_err(SquashError::Produce),
    }
}

fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cur = err.source();
    }
    false
}
