//! The default base image: Debian's static busybox plus a minimal `/etc`.

use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use crate::archive::{ConfigSpec, Entry, ImageSpec};

/// Where Debian's `busybox-static` installs the binary.
const BUSYBOX: &str = "/bin/busybox";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
app:x:1000:1000:app:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:app\nnogroup:x:65534:\n";
const OS_RELEASE: &str =
    "NAME=\"Matchlock Busybox\"\nID=matchlock-busybox\nPRETTY_NAME=\"Matchlock Busybox\"\n";

/// The busybox image as a spec (layer 1: `/bin/busybox` and applet links; layer 2: `/etc`,
/// `/tmp`, `/root`, `/home/app`, `/usr/bin/env`).
pub fn busybox_spec() -> io::Result<ImageSpec> {
    busybox_spec_from(Path::new(BUSYBOX))
}

fn busybox_spec_from(busybox: &Path) -> io::Result<ImageSpec> {
    let binary = std::fs::read(busybox)?;
    let out = Command::new(busybox).arg("--list").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} --list failed: {}",
            busybox.display(),
            out.status
        )));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    if !applets.iter().any(|a| a == "sh") {
        applets.push("sh".to_owned());
    }
    applets.sort();
    applets.dedup();

    let mut base = vec![
        Entry::dir("bin"),
        Entry::file("bin/busybox", binary).mode(0o755),
    ];
    base.extend(
        applets
            .iter()
            .map(|a| Entry::symlink(&format!("bin/{a}"), "busybox")),
    );

    let etc = vec![
        Entry::dir("etc"),
        Entry::file("etc/passwd", PASSWD),
        Entry::file("etc/group", GROUP),
        Entry::file("etc/os-release", OS_RELEASE),
        Entry::file("etc/hostname", "matchlock\n"),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("root").mode(0o700),
        Entry::dir("home"),
        Entry::dir("home/app").owner(1000, 1000),
        Entry::dir("usr"),
        Entry::dir("usr/bin"),
        Entry::symlink("usr/bin/env", "/bin/busybox"),
        Entry::dir("sbin"),
        Entry::dir("usr/sbin"),
        Entry::dir("usr/local"),
        Entry::dir("usr/local/bin"),
        Entry::dir("var"),
        Entry::dir("var/tmp").mode(0o1777),
        Entry::dir("dev"),
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::dir("run"),
    ];
    Ok(ImageSpec {
        layers: vec![base, etc],
        config: ConfigSpec {
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ],
            cmd: vec!["/bin/sh".to_owned()],
            ..Default::default()
        },
        repo_tag: Some("busybox:latest".to_owned()),
        ..Default::default()
    })
}

/// Writes the busybox base image as a `docker save` archive to `out`.
pub fn busybox_image(mut out: impl Write) -> io::Result<()> {
    let spec = busybox_spec()?;
    out.write_all(&spec.docker_save())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Kind;

    #[test]
    fn busybox_spec_has_shell_and_users() {
        let spec = busybox_spec().expect("busybox-static must be installed (/bin/busybox)");
        let all: Vec<&Entry> = spec.layers.iter().flatten().collect();
        let find = |p: &str| all.iter().find(|e| e.path == p).copied();
        assert_eq!(
            find("bin/sh").map(|e| &e.kind),
            Some(&Kind::Symlink("busybox".into()))
        );
        assert!(find("bin/ls").is_some());
        assert!(
            matches!(find("bin/busybox").map(|e| &e.kind), Some(Kind::File(c)) if c.len() > 100_000)
        );
        let passwd = find("etc/passwd").expect("passwd");
        assert!(
            matches!(&passwd.kind, Kind::File(c) if String::from_utf8_lossy(c).contains("app:x:1000:1000:app:/home/app"))
        );
        assert_eq!(find("tmp").map(|e| e.mode), Some(0o1777));
        assert_eq!(find("home/app").map(|e| (e.uid, e.gid)), Some((1000, 1000)));
    }
}
