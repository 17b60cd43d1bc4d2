//! Static test binaries for guest images: built from one std-only source file with a bare
//! `rustc` and glibc `+crt-static` (as the guest runtime is), so they run in the busybox
//! image, which has no libc.
//!
//! # Design
//! `rustc` directly rather than a nested `cargo build`: the source needs no crate, so the
//! build takes a couple of seconds, and no cargo lock is contended with the `cargo test` that
//! runs us. The same file is also an ordinary bin target of this crate, so it is compiled,
//! linted and formatted with the workspace.
//!
//! # Limitations
//! x86_64 Linux hosts only (the guest architecture); `rustc` must be on `PATH` (it is
//! wherever `cargo test` runs, through rustup and `rust-toolchain.toml`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Source of `vsock-probe` (see that file for what it does).
const VSOCK_PROBE_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bin/vsock-probe.rs");

/// Builds the static `vsock-probe` into `out_dir` and returns its path.
pub fn vsock_probe_binary(out_dir: &Path) -> io::Result<PathBuf> {
    build_static(Path::new(VSOCK_PROBE_SRC), &out_dir.join("vsock-probe"))
}

fn build_static(src: &Path, out: &Path) -> io::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        // The workspace root, so rustup picks the pinned toolchain.
        .current_dir(&workspace)
        .args([
            "--edition",
            "2021",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
        ])
        .args([
            "-C",
            "strip=debuginfo",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(out)
        .arg(src)
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "rustc {} failed ({}): {}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an ELF64 file has a `PT_INTERP` program header (a dynamic loader).
    fn has_interpreter(elf: &[u8]) -> bool {
        let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        assert_eq!(&elf[..4], b"\x7fELF");
        (0..phnum).any(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes")) == 3
        })
    }

    #[test]
    fn vsock_probe_is_static_and_reports_its_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = vsock_probe_binary(dir.path()).expect("build");
        let elf = std::fs::read(&bin).expect("read");
        assert!(
            !has_interpreter(&elf),
            "{} is dynamically linked",
            bin.display()
        );
        // The check itself: this test binary is an ordinary, dynamically linked one.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read self");
        assert!(has_interpreter(&me));
        // Bad usage is refused; a run reports the step it stopped at (vsock may not even exist
        // on this host, so either step is fine, but never a reply from nowhere).
        let usage = Command::new(&bin).output().expect("run");
        assert_eq!(usage.status.code(), Some(64));
        let out = Command::new(&bin)
            .args(["4294967295", "1"])
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("socket: ") || text.starts_with("connect: "),
            "{text}"
        );
    }
}
