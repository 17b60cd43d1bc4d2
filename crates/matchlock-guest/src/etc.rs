//! Rendering of `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf` and `/etc/machine-id`,
//! and validation of the host-supplied `add_hosts` entries and machine id.
//!
//! # Design
//! Pure string functions, so the exact file contents are unit tested; [`write_identity_files`]
//! is the only part touching the filesystem. `resolv.conf` is removed before writing because
//! images often ship it as a symlink (systemd-resolved) that must not be followed.
//!
//! # Limitations
//! DNS server strings are written as given (the host validates them).

#![forbid(unsafe_code)]

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use matchlock_guest_proto::HostEntry;

/// Hostname used when the host sends an empty one.
pub const DEFAULT_HOSTNAME: &str = "matchlock";

#[derive(Debug, thiserror::Error)]
pub enum EtcError {
    #[error("the host sent a machine id that is not 32 lowercase hex digits")]
    BadMachineId,
    #[error("invalid add_host entry {host:?} -> {ip:?}")]
    BadHost { host: String, ip: String },
    #[error("creating {path}")]
    MkdirEtc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The effective hostname.
pub fn effective_hostname(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_HOSTNAME
    } else {
        name
    }
}

/// Checks every entry: host non-empty without whitespace or ':', ip a valid address.
pub fn validate_hosts(entries: &[HostEntry]) -> Result<(), EtcError> {
    for e in entries {
        let host_ok = !e.host.is_empty() && !e.host.chars().any(|c| c.is_whitespace() || c == ':');
        if !host_ok || e.ip.parse::<IpAddr>().is_err() {
            return Err(EtcError::BadHost {
                host: e.host.clone(),
                ip: e.ip.clone(),
            });
        }
    }
    Ok(())
}

/// `/etc/hosts` contents.
pub fn render_hosts(hostname: &str, entries: &[HostEntry]) -> String {
    let mut s = format!("127.0.0.1 localhost localhost.localdomain {hostname}\n");
    for e in entries {
        s.push_str(&format!("{} {}\n", e.ip, e.host));
    }
    s.push_str("::1 localhost ip6-localhost ip6-loopback\n");
    s.push_str("ff02::1 ip6-allnodes\n");
    s.push_str("ff02::2 ip6-allrouters\n");
    s
}

/// `/etc/resolv.conf` contents.
pub fn render_resolv(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect()
}

fn write(path: PathBuf, contents: &str) -> Result<(), EtcError> {
    std::fs::write(&path, contents).map_err(|source| EtcError::Write { path, source })
}

/// Whether `id` is a machine id as `machine-id(5)` defines it: 32 lowercase hex digits.
pub fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes `etc/machine-id` under `root` (a symlink there is replaced, not followed).
/// An invalid id is refused.
pub fn write_machine_id(root: &Path, id: &str) -> Result<(), EtcError> {
    if !valid_machine_id(id) {
        return Err(EtcError::BadMachineId);
    }
    let path = root.join("etc/machine-id");
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(EtcError::Remove { path, source }),
    }
    write(path, &format!("{id}\n"))
}

/// Writes hostname, hosts and resolv.conf under `root` (the new root, normally `/`).
pub fn write_identity_files(
    root: &Path,
    hostname: &str,
    entries: &[HostEntry],
    dns: &[String],
) -> Result<(), EtcError> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(|source| EtcError::MkdirEtc {
        path: etc.clone(),
        source,
    })?;
    write(etc.join("hostname"), &format!("{hostname}\n"))?;
    write(etc.join("hosts"), &render_hosts(hostname, entries))?;
    let resolv = etc.join("resolv.conf");
    match std::fs::remove_file(&resolv) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EtcError::Remove {
                path: resolv,
                source,
            })
        }
    }
    write(resolv, &render_resolv(dns))
}

/// Where the interception CA is written, relative to the root.
pub const CA_FILE: &str = "etc/ssl/certs/matchlock-ca.crt";
/// The image's system bundle plus the CA, for `SSL_CERT_FILE` and friends.
pub const CA_BUNDLE: &str = "etc/ssl/certs/matchlock-bundle.crt";
/// System bundles the CA is appended to, in the order looked for (Debian/Alpine, Fedora).
const SYSTEM_BUNDLES: [&str; 2] = [
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
];
/// Largest system bundle read (real ones are ~200 KiB).
const MAX_BUNDLE: u64 = 16 << 20;

/// Installs the host's interception CA: [`CA_FILE`], appended to the image's system bundle
/// when it has one (so tools that ignore the environment trust it too), and [`CA_BUNDLE`]
/// (system bundle + CA), which the exec environment points `SSL_CERT_FILE` at so TLS that
/// is not intercepted still verifies against the image's roots.
pub fn install_ca(root: &Path, pem: &str) -> Result<(), EtcError> {
    let dir = root.join("etc/ssl/certs");
    std::fs::create_dir_all(&dir).map_err(|source| EtcError::MkdirEtc {
        path: dir.clone(),
        source,
    })?;
    let pem = if pem.ends_with('\n') {
        pem.to_string()
    } else {
        format!("{pem}\n")
    };
    let mut system = String::new();
    for b in SYSTEM_BUNDLES {
        let path = root.join(b);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > MAX_BUNDLE {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&path) {
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            write(path, &format!("{text}{sep}{pem}"))?;
            system = format!("{text}{sep}");
            break;
        }
    }
    for (name, contents) in [
        (CA_FILE, pem.clone()),
        (CA_BUNDLE, format!("{system}{pem}")),
    ] {
        let path = root.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(EtcError::Remove { path, source }),
        }
        write(path, &contents)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn he(host: &str, ip: &str) -> HostEntry {
        HostEntry {
            host: host.into(),
            ip: ip.into(),
        }
    }

    #[test]
    fn hosts_exact() {
        let got = render_hosts("box", &[he("db", "10.0.0.5"), he("v6", "fd00::1")]);
        assert_eq!(
            got,
            "127.0.0.1 localhost localhost.localdomain box\n\
             10.0.0.5 db\n\
             fd00::1 v6\n\
             ::1 localhost ip6-localhost ip6-loopback\n\
             ff02::1 ip6-allnodes\n\
             ff02::2 ip6-allrouters\n"
        );
        assert_eq!(effective_hostname(""), "matchlock");
        assert_eq!(effective_hostname("x"), "x");
    }

    #[test]
    fn validation() {
        assert!(validate_hosts(&[he("db", "10.0.0.5"), he("x.y", "::1")]).is_ok());
        for bad in [
            he("", "1.2.3.4"),
            he("a b", "1.2.3.4"),
            he("a:b", "1.2.3.4"),
            he("a\tb", "1.2.3.4"),
            he("db", "999.1.1.1"),
            he("db", ""),
            he("db", "example.com"),
        ] {
            assert!(
                validate_hosts(std::slice::from_ref(&bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ca_installed_into_bundle() {
        let base = std::env::temp_dir().join(format!("mlg-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, bare) = (base.join("a"), base.join("b"));
        let certs = root.join("etc/ssl/certs");
        std::fs::create_dir_all(&certs).expect("mkdir");
        std::fs::write(certs.join("ca-certificates.crt"), "SYSTEM").expect("write");
        // An image's symlink at our name must be replaced, not followed.
        std::os::unix::fs::symlink("/nonexistent", certs.join("matchlock-ca.crt")).expect("ln");
        install_ca(&root, "CA").expect("install");
        let read = |n: &str| std::fs::read_to_string(certs.join(n)).expect("read");
        assert_eq!(read("ca-certificates.crt"), "SYSTEM\nCA\n");
        assert_eq!(read("matchlock-ca.crt"), "CA\n");
        assert_eq!(read("matchlock-bundle.crt"), "SYSTEM\nCA\n");
        install_ca(&bare, "CA\n").expect("install");
        let b = bare.join("etc/ssl/certs/matchlock-bundle.crt");
        assert_eq!(std::fs::read_to_string(b).expect("read"), "CA\n");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn resolv_and_files() {
        assert_eq!(
            render_resolv(&["8.8.8.8".into(), "1.1.1.1".into()]),
            "nameserver 8.8.8.8\nnameserver 1.1.1.1\n"
        );
        let dir = std::env::temp_dir().join(format!("mlg-etc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
        // A dangling symlink, as systemd-resolved images ship it: must be replaced, not followed.
        std::os::unix::fs::symlink("/nonexistent/stub", dir.join("etc/resolv.conf"))
            .expect("symlink");
        write_identity_files(&dir, "h", &[], &["9.9.9.9".into()]).expect("write");
        let meta = std::fs::symlink_metadata(dir.join("etc/resolv.conf")).expect("stat");
        assert!(meta.is_file());
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/resolv.conf")).expect("read"),
            "nameserver 9.9.9.9\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/hostname")).expect("read"),
            "h\n"
        );
        // machine-id: a symlink is replaced; invalid ids are refused.
        std::os::unix::fs::symlink("/nonexistent/id", dir.join("etc/machine-id")).expect("ln");
        let id = "0123456789abcdef0123456789abcdef";
        write_machine_id(&dir, id).expect("machine-id");
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/machine-id")).expect("read"),
            format!("{id}\n")
        );
        for bad in ["", "0123456789ABCDEF0123456789ABCDEF", "../../x", &id[..31]] {
            assert!(matches!(
                write_machine_id(&dir, bad),
                Err(EtcError::BadMachineId)
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
