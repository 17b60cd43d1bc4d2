//! `mkimage busybox > image.tar`: writes a test image archive (`docker save` format) to stdout.
//! `mkimage nettest`: builds (once per machine, cached) the network test image and prints the
//! path of its `docker save` archive.

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "busybox" => {
            let stdout = std::io::stdout().lock();
            matchlock_test_support::busybox_image(stdout).context("writing busybox image")?;
            Ok(())
        }
        "nettest" => {
            let path =
                matchlock_test_support::nettest_image().context("building the nettest image")?;
            println!("{}", path.display());
            Ok(())
        }
        _ => bail!("usage: mkimage busybox > image.tar | mkimage nettest"),
    }
}
