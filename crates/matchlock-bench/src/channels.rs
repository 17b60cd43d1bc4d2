//! `matchlock-bench channels`: the two host-channel transports (vsock, virtio-serial) side by
//! side at boot, in terms that a loaded host distorts least (issue 11, the serial slowdown).
//!
//! # Design
//! Each round boots, for each channel in turn (the order alternates between rounds so a
//! trend in the host's load falls on both):
//! - the bare VM of the cold benchmark (same kernel and initramfs, powered off as `/init`
//!   starts) with `initcall_debug printk.time=1 loglevel=8`, and reads from its console log
//!   the guest-clock time at which the kernel ran `/init` and every initcall's own duration
//!   (the kernel measures them, so host load only enters through the emulated CPU's speed);
//! - the in-process cold sample of `breakdown.rs` (no kernel options added), whose guest
//!   phases (kernel to `/init`, `/init` to `Ready`) come from the guest's clock.
//!
//! Both are also measured in CPU time (`/proc/self/stat`: this process, and its reaped
//! children, i.e. QEMU and `vhost-device-vsock`): time a loaded host takes away from the VM
//! stretches the guest's clock but not the CPU time QEMU spends emulating it.
//!
//! It prints the medians per channel and the initcalls whose median duration differs most
//! (named through `nm` of the kernel image when it has symbols: the guest kernel is built
//! without `KALLSYMS`, so its log shows addresses).
//!
//! # Limitations
//! The channel of the in-process boot is chosen through `MATCHLOCK_DEV_CHANNEL`, set in this
//! process between boots (nothing else reads the environment then). Printing every initcall
//! on the emulated UART slows the debug boot itself; its figures compare channels, not
//! absolute boot time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use matchlock_vm::Channel;

use crate::breakdown::Sample;
use crate::{median, ms, Bench};

/// The kernel options of the debug boot.
const DEBUG_CMDLINE: [&str; 3] = ["initcall_debug", "printk.time=1", "loglevel=8"];
/// What the guest agent logs when it found the host end of the serial port not connected
/// (`crates/matchlock-guest/src/hostchan.rs`).
const POLL_MARK: &str = "host channel not connected yet";
/// How many initcalls with the largest difference to print.
const TOP: usize = 12;

/// What one debug boot's console log says.
#[derive(Debug, Default, Clone, PartialEq)]
struct KernelLog {
    /// Guest-clock time of "Run /init as init process".
    init_at: Option<Duration>,
    /// initcall name -> duration.
    initcalls: BTreeMap<String, Duration>,
}

/// `[   12.345678] rest` -> (time, rest).
fn stamp(line: &str) -> Option<(Duration, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (t, rest) = rest.split_once(']')?;
    let secs: f64 = t.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (Duration::from_secs_f64(secs), rest.trim()))
}

/// Parses `initcall NAME+0x0/0x40 returned 0 after 123 usecs` and "Run /init" lines.
fn parse_log(text: &str) -> KernelLog {
    let mut log = KernelLog::default();
    for line in text.lines() {
        let Some((t, rest)) = stamp(line) else {
            continue;
        };
        if rest.starts_with("Run /init as init process") {
            log.init_at = Some(t);
        }
        let Some(call) = rest.strip_prefix("initcall ") else {
            continue;
        };
        let Some((name, tail)) = call.split_once(" returned ") else {
            continue;
        };
        let name = name.split('+').next().unwrap_or(name);
        let us = tail
            .split_once(" after ")
            .and_then(|(_, d)| d.strip_suffix(" usecs"))
            .and_then(|d| d.trim().parse::<u64>().ok());
        if let Some(us) = us {
            *log.initcalls.entry(name.to_owned()).or_default() += Duration::from_micros(us);
        }
    }
    log
}

/// Formats one printed row from one channel's boots.
type Row = dyn Fn(&PerChannel) -> String;

/// All boots of one channel.
#[derive(Default)]
struct PerChannel {
    logs: Vec<KernelLog>,
    samples: Vec<Sample>,
    /// CPU time of the debug boot's QEMU (and helper).
    bare_cpu: Vec<Duration>,
    /// CPU time of the cold sample: this process (the owner), and QEMU (and helper).
    cold_own_cpu: Vec<Duration>,
    cold_child_cpu: Vec<Duration>,
}

/// CPU time of this process and of its reaped children (`/proc/self/stat`, 10 ms ticks).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    own: Duration,
    children: Duration,
}

impl Cpu {
    fn now() -> anyhow::Result<Cpu> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        Cpu::parse(&stat).context("parse /proc/self/stat")
    }

    fn parse(stat: &str) -> Option<Cpu> {
        // Fields after `(comm)`: state is field 3; utime..cstime are fields 14..17.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // USER_HZ is 100 on every Linux architecture we run on.
        let tick = |n: u64| Duration::from_millis(n * 10);
        (f.len() == 4).then(|| Cpu {
            own: tick(f[0] + f[1]),
            children: tick(f[2] + f[3]),
        })
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            own: self.own.saturating_sub(before.own),
            children: self.children.saturating_sub(before.children),
        }
    }
}

impl PerChannel {
    fn initcall_median(&self, name: &str) -> Duration {
        median(
            self.logs
                .iter()
                .map(|l| l.initcalls.get(name).copied().unwrap_or_default())
                .collect(),
        )
    }
}

/// Address -> symbol of the kernel's text (`nm`); empty when `nm` or the symbols are missing.
fn kernel_symbols(kernel: &Path) -> HashMap<String, String> {
    let Ok(out) = Command::new("nm").arg(kernel).output() else {
        return HashMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (addr, _, name) = (w.next()?, w.next()?, w.next()?);
            Some((format!("0x{addr}"), name.to_owned()))
        })
        .collect()
}

fn set_channel(ch: Channel) {
    let v = match ch {
        Channel::Vsock => "vsock",
        Channel::Serial => "serial",
    };
    std::env::set_var(matchlock_vm::CHANNEL_ENV, v);
}

impl Bench {
    /// The `channels` benchmark (module docs).
    pub(crate) fn channels(&self) -> anyhow::Result<()> {
        let saved = std::env::var_os(matchlock_vm::CHANNEL_ENV);
        let (mut vsock, mut serial) = (PerChannel::default(), PerChannel::default());
        for round in 0..self.runs {
            let order = if round % 2 == 0 {
                [Channel::Vsock, Channel::Serial]
            } else {
                [Channel::Serial, Channel::Vsock]
            };
            for ch in order {
                let per = if ch == Channel::Vsock {
                    &mut vsock
                } else {
                    &mut serial
                };
                let c0 = Cpu::now()?;
                let (_, console) = self.bare_boot_with(ch, &DEBUG_CMDLINE)?;
                let c1 = Cpu::now()?;
                per.logs.push(parse_log(&console));
                per.bare_cpu.push(c1.since(c0).children);
                set_channel(ch);
                per.samples.push(self.cold_in_process()?);
                let c2 = Cpu::now()?.since(c1);
                per.cold_own_cpu.push(c2.own);
                per.cold_child_cpu.push(c2.children);
            }
        }
        match saved {
            Some(v) => std::env::set_var(matchlock_vm::CHANNEL_ENV, v),
            None => std::env::remove_var(matchlock_vm::CHANNEL_ENV),
        }
        let symbols = kernel_symbols(&matchlock_vm::assets::kernel_path());
        print(&vsock, &serial, self.runs, &symbols);
        Ok(())
    }
}

fn opt_median(v: Vec<Option<Duration>>) -> String {
    let n = v.len();
    let some: Vec<Duration> = v.into_iter().flatten().collect();
    if some.len() < n || n == 0 {
        return "n/a".into();
    }
    ms(median(some))
}

fn print(vsock: &PerChannel, serial: &PerChannel, runs: usize, symbols: &HashMap<String, String>) {
    println!("host channel at boot ({runs} interleaved rounds, medians; vsock | serial):");
    let rows: [(&str, &Row); 9] = [
        ("debug boot: kernel to /init (guest clock)", &|p| {
            opt_median(p.logs.iter().map(|l| l.init_at).collect())
        }),
        ("debug boot: sum of initcalls", &|p| {
            ms(median(
                p.logs.iter().map(|l| l.initcalls.values().sum()).collect(),
            ))
        }),
        ("cold sample: kernel to /init (guest clock)", &|p| {
            opt_median(p.samples.iter().map(|s| s.phases.kernel_to_init).collect())
        }),
        ("cold sample: /init to Ready (guest clock)", &|p| {
            opt_median(p.samples.iter().map(|s| s.phases.init_to_ready).collect())
        }),
        ("cold sample: first exec", &|p| {
            ms(median(p.samples.iter().map(|s| s.first_exec).collect()))
        }),
        ("cold sample: boots where the guest polled", &|p| {
            let polled = p
                .samples
                .iter()
                .filter(|s| s.console.contains(POLL_MARK))
                .count();
            format!("{polled} of {}", p.samples.len())
        }),
        ("debug boot: CPU of QEMU (+ helper)", &|p| {
            ms(median(p.bare_cpu.clone()))
        }),
        ("cold sample: CPU of QEMU (+ helper)", &|p| {
            ms(median(p.cold_child_cpu.clone()))
        }),
        ("cold sample: CPU of the owner (this process)", &|p| {
            ms(median(p.cold_own_cpu.clone()))
        }),
    ];
    for (name, f) in rows {
        println!("  {name:<46} {:>12} | {:>12}", f(vsock), f(serial));
    }
    let names: BTreeSet<&String> = vsock
        .logs
        .iter()
        .chain(&serial.logs)
        .flat_map(|l| l.initcalls.keys())
        .collect();
    let mut diffs: Vec<(f64, &String, Duration, Duration)> = names
        .into_iter()
        .map(|n| {
            let (v, s) = (vsock.initcall_median(n), serial.initcall_median(n));
            (s.as_secs_f64() - v.as_secs_f64(), n, v, s)
        })
        .collect();
    diffs.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()));
    println!("  initcalls differing most (median duration, vsock | serial):");
    for (_, name, v, s) in diffs.into_iter().take(TOP) {
        let name = symbols.get(name).unwrap_or(name);
        println!("    {name:<44} {:>12} | {:>12}", ms(v), ms(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initcalls_and_init() {
        let text = "\
[    0.101000] calling  virtio_cons_init+0x0/0x9c @ 1
[    0.102345] initcall virtio_cons_init+0x0/0x9c returned 0 after 1345 usecs
[    0.2] initcall broken returned 0 after x usecs
garbage [ line
[    1.500000] Run /init as init process
";
        let log = parse_log(text);
        assert_eq!(log.init_at, Some(Duration::from_millis(1500)));
        assert_eq!(
            log.initcalls.get("virtio_cons_init"),
            Some(&Duration::from_micros(1345))
        );
        assert_eq!(log.initcalls.len(), 1);
    }

    #[test]
    fn parses_cpu_times() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 20 5 20 0 1 0 9 0";
        let c = Cpu::parse(stat).expect("parse");
        assert_eq!(c.own, Duration::from_millis(100));
        assert_eq!(c.children, Duration::from_millis(250));
        assert!(Cpu::parse("42 (x) S 1").is_none());
    }
}
