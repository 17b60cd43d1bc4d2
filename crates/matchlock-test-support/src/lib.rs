//! Dev-only fixtures shared by the workspace's tests: polling with a deadline, builders for
//! `docker save` and OCI-layout archives from in-memory layer specs, a realistic busybox
//! base image built from Debian's `busybox-static`, the `nettest` image (a minimal Debian root
//! with curl and python3, cached per machine), static test binaries to put in guest images
//! (`vsock-probe`), and `matchlock-testhost`, the servers the network tests talk to.
//!
//! # Design
//! - Archives are built in memory (test images are small) with the `tar` crate, but entry
//!   names, link targets and xattrs are written byte-for-byte (ustar fields or PAX records)
//!   without the `tar` crate's path validation, so tests can build hostile archives
//!   (`..` components, absolute paths) as easily as well-formed ones.
//! - Digests are computed the way Docker/OCI do (sha256 of the exact bytes), so importers can
//!   verify them; knobs exist to corrupt them on purpose.
//!
//! # Limitations
//! - Everything is held in memory; do not build multi-GiB fixtures with this.
//! - Only the archive shapes Docker and the OCI image-layout spec produce are covered
//!   (single image per archive, optional second platform in OCI indexes).

#![forbid(unsafe_code)]

mod archive;
mod busybox;
mod debian;
mod registry;
mod static_bin;

pub use archive::{layer_tar, ConfigSpec, Entry, ImageSpec, Kind, RegistryParts};
pub use busybox::{busybox_image, busybox_spec};
pub use debian::{
    nettest_image, nettest_image_in, resolve as resolve_debian_packages, test_image_cache_dir,
    DebianImageError, Package, NETTEST_PACKAGES,
};
pub use registry::{FaultProxy, Faults, Registry, REGISTRY_BIN};
pub use static_bin::vsock_probe_binary;

use std::time::{Duration, Instant};

/// Polls `cond` (every 20 ms, backing off to 200 ms) until it returns true or `timeout`
/// passes; the error names `what` and the timeout.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if cond() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_succeeds_and_times_out() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), "counter", || {
            n += 1;
            n >= 3
        })
        .expect("condition becomes true");
        assert_eq!(n, 3);
        let start = Instant::now();
        let err =
            wait_until(Duration::from_millis(100), "never", || false).expect_err("must time out");
        assert!(err.contains("never"), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
