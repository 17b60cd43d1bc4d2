//! Choosing between KVM and TCG.
//!
//! # Design
//! KVM is usable only if all of these hold:
//! - `/dev/kvm` opens read-write (permissions);
//! - it is not PVM-backed: the `kvm_pvm` module is not loaded (`/sys/module/kvm_pvm` or
//!   `/proc/modules`). PVM (paravirtual KVM inside a cloud VM) runs standard guest kernels
//!   about a thousand times slower and crashes them with `KVM internal error ... emulation
//!   failure`, so it counts as unusable (measured, DESIGN §2);
//! - the CPU advertises `vmx` or `svm` in `/proc/cpuinfo`.
//!
//! `auto` falls back to TCG with a one-line reason for the user. An explicit `kvm` request is
//! honoured as a choice even when unusable; the backend's `start` then fails with the reason,
//! rather than silently running something the user did not ask for.
//!
//! # Limitations
//! Linux only; no HVF. The probe reads host files each call (cheap, not cached) so a
//! permission change is noticed by the next sandbox.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;
use std::str::FromStr;

/// Requested or chosen acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Accel {
    /// KVM when usable, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (slow but works everywhere).
    Tcg,
}

impl Accel {
    /// The lower-case name (`auto`, `kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `FromStr` failure for [`Accel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {value:?} (expected auto, kvm or tcg)")]
pub struct ParseAccelError {
    pub value: String,
}

impl FromStr for Accel {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ParseAccelError {
                value: s.to_owned(),
            }),
        }
    }
}

/// The outcome of [`detect_accel`]: `accel` is `Kvm` or `Tcg`, never `Auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// One line for the user, e.g. `KVM unavailable: ...; using TCG (slow)`.
    pub reason: String,
}

/// Resolves `requested` against this host.
pub fn detect_accel(requested: Accel) -> AccelChoice {
    choose(requested, || probe_kvm(&HostFiles::real()))
}

/// Why KVM cannot be used here, or `Ok(())` if it can.
pub(crate) fn kvm_usable() -> Result<(), String> {
    probe_kvm(&HostFiles::real())
}

fn choose(requested: Accel, probe: impl FnOnce() -> Result<(), String>) -> AccelChoice {
    match requested {
        Accel::Tcg => AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG requested (slow)".to_owned(),
        },
        Accel::Kvm => match probe() {
            Ok(()) => AccelChoice {
                accel: Accel::Kvm,
                reason: "KVM requested and usable".to_owned(),
            },
            Err(why) => AccelChoice {
                accel: Accel::Kvm,
                reason: format!("KVM requested but unusable: {why}"),
            },
        },
        Accel::Auto => match probe() {
            Ok(()) => AccelChoice {
                accel: Accel::Kvm,
                reason: "KVM available".to_owned(),
            },
            Err(why) => AccelChoice {
                accel: Accel::Tcg,
                reason: format!("KVM unavailable: {why}; using TCG (slow)"),
            },
        },
    }
}

/// Host file locations, parameterised so tests can point at fixtures.
struct HostFiles<'a> {
    dev_kvm: &'a Path,
    sys_module_pvm: &'a Path,
    proc_modules: &'a Path,
    cpuinfo: &'a Path,
}

impl HostFiles<'static> {
    fn real() -> Self {
        HostFiles {
            dev_kvm: Path::new("/dev/kvm"),
            sys_module_pvm: Path::new("/sys/module/kvm_pvm"),
            proc_modules: Path::new("/proc/modules"),
            cpuinfo: Path::new("/proc/cpuinfo"),
        }
    }
}

fn probe_kvm(files: &HostFiles<'_>) -> Result<(), String> {
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(files.dev_kvm)
    {
        return Err(format!(
            "cannot open {} read-write ({e})",
            files.dev_kvm.display()
        ));
    }
    let pvm_module = files.sys_module_pvm.exists()
        || std::fs::read_to_string(files.proc_modules)
            .map(|m| {
                m.lines()
                    .any(|l| l.split_whitespace().next() == Some("kvm_pvm"))
            })
            .unwrap_or(false);
    if pvm_module {
        return Err(
            "/dev/kvm is PVM-backed (module kvm_pvm), too slow for standard guests".to_owned(),
        );
    }
    let cpuinfo = std::fs::read_to_string(files.cpuinfo).unwrap_or_default();
    if !cpu_has_virt(&cpuinfo) {
        return Err("CPU lacks vmx/svm".to_owned());
    }
    Ok(())
}

fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("auto".parse::<Accel>(), Ok(Accel::Auto));
        assert_eq!("KVM".parse::<Accel>(), Ok(Accel::Kvm));
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
        assert_eq!(Accel::Tcg.to_string(), "tcg");
    }

    #[test]
    fn auto_follows_the_probe_on_this_host() {
        // Development machines have a PVM-backed /dev/kvm and no vmx/svm (DESIGN §2) and fall
        // back to TCG; a host with working KVM picks KVM. Either way `auto` follows the probe.
        let choice = detect_accel(Accel::Auto);
        match kvm_usable() {
            Ok(()) => {
                assert_eq!(choice.accel, Accel::Kvm, "{}", choice.reason);
                assert_eq!(choice.reason, "KVM available");
            }
            Err(why) => {
                assert_eq!(choice.accel, Accel::Tcg, "{}", choice.reason);
                assert_eq!(
                    choice.reason,
                    format!("KVM unavailable: {why}; using TCG (slow)")
                );
            }
        }
    }

    #[test]
    fn explicit_kvm_is_kept_even_when_unusable() {
        let choice = choose(Accel::Kvm, || Err("nope".to_owned()));
        assert_eq!(choice.accel, Accel::Kvm);
        assert!(choice.reason.contains("nope"));
        let choice = choose(Accel::Auto, || Ok(()));
        assert_eq!(choice.accel, Accel::Kvm);
        let choice = choose(Accel::Tcg, || panic!("tcg must not probe"));
        assert_eq!(choice.accel, Accel::Tcg);
    }

    #[test]
    fn probe_detects_each_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kvm = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        let modules = dir.path().join("modules");
        let cpuinfo = dir.path().join("cpuinfo");
        let files = HostFiles {
            dev_kvm: &kvm,
            sys_module_pvm: &pvm,
            proc_modules: &modules,
            cpuinfo: &cpuinfo,
        };
        let err = probe_kvm(&files).expect_err("no /dev/kvm");
        assert!(err.contains("cannot open"), "{err}");

        std::fs::write(&kvm, "").expect("write");
        std::fs::write(&cpuinfo, "flags\t\t: fpu vme svm sse\n").expect("write");
        std::fs::write(
            &modules,
            "kvm_pvm 1 0 - Live 0x0\nkvm 2 1 kvm_pvm, Live 0x0\n",
        )
        .expect("write");
        let err = probe_kvm(&files).expect_err("pvm via /proc/modules");
        assert!(err.contains("PVM"), "{err}");

        std::fs::write(&modules, "kvm_intel 1 0 - Live 0x0\n").expect("write");
        std::fs::create_dir(&pvm).expect("mkdir");
        let err = probe_kvm(&files).expect_err("pvm via /sys/module");
        assert!(err.contains("PVM"), "{err}");

        std::fs::remove_dir(&pvm).expect("rmdir");
        assert_eq!(probe_kvm(&files), Ok(()));

        std::fs::write(&cpuinfo, "flags\t\t: fpu vme sse\n").expect("write");
        let err = probe_kvm(&files).expect_err("no vmx");
        assert!(err.contains("vmx/svm"), "{err}");
    }
}
