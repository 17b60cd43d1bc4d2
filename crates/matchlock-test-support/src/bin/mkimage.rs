//! `mkimage busybox > image.tar`: writes a test image archive (`docker save` format) to stdout.

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "busybox" => {
            let stdout = std::io::stdout().lock();
            matchlock_test_support::busybox_image(stdout).context("writing busybox image")?;
            Ok(())
        }
        _ => bail!("usage: mkimage busybox > image.tar"),
    }
}
