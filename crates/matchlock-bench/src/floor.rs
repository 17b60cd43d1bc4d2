//! The emulated exec floor (DESIGN §11, issue 11 item 1) and every exec row's ratio to it.
//!
//! # Design
//! The floor is what any exec must pay on this machine whatever our code does: a new vsock
//! connection with one Ping/Pong round trip (measured by the caller on the same sandbox)
//! plus the guest's own spawn and wait of `/bin/true`. The spawn is timed inside the guest,
//! so no host cost is in it: one `sh` command runs `/bin/true` in a loop and reads
//! `/proc/uptime` around it, then runs the same loop with the builtin `:` so the loop's own
//! cost is subtracted. The guest's clock is the VM's, so the figure is in the same (emulated)
//! time the exec rows are paid in.
//!
//! # Limitations
//! `/proc/uptime` has a 10 ms resolution: with [`SPAWNS`] iterations of ~3 ms the error is
//! under 1 %. The spawn is busybox `sh`'s fork+exec, a small single-threaded process; the
//! guest agent is multi-threaded, so the floor is the cheapest spawn the guest can do, not
//! the agent's current cost (which is the point: the gap is ours to close).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use matchlock_guest_proto::GuestTiming;
use matchlock_sandbox::exec::ExecTimeline;

/// Iterations of the guest-side spawn loop.
pub const SPAWNS: u32 = 300;

/// The loop run inside the guest; prints three `/proc/uptime` readings: before the `/bin/true`
/// loop, between the two loops, after the empty loop.
fn script(n: u32) -> String {
    let up = "$(cut -d' ' -f1 /proc/uptime)";
    format!(
        "a={up}; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; b={up}; \
         i=0; while [ $i -lt {n} ]; do :; i=$((i+1)); done; c={up}; echo $a $b $c"
    )
}

/// Per-iteration cost of `/bin/true` from the three readings, the empty loop subtracted.
fn per_spawn(out: &str, n: u32) -> anyhow::Result<Duration> {
    let v: Vec<f64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("guest spawn loop printed {out:?}"))?;
    let [a, b, c] = v[..] else {
        bail!("guest spawn loop printed {out:?}, expected three uptimes");
    };
    let spent = (b - a) - (c - b);
    if !spent.is_finite() || spent <= 0.0 {
        bail!("guest spawn loop: non-positive time ({out:?})");
    }
    Ok(Duration::from_secs_f64(spent / f64::from(n)))
}

/// Times the guest's own spawn+wait of `/bin/true` in sandbox `id` (via `matchlock exec`,
/// whose cost is outside the guest-timed window).
pub async fn guest_spawn(bin: &Path, home: &Path, id: &str) -> anyhow::Result<Duration> {
    let out = tokio::process::Command::new(bin)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .args(["exec", id, "sh", "-c", &script(SPAWNS)])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("spawn matchlock exec")?;
    if !out.status.success() {
        bail!(
            "guest spawn loop failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    per_spawn(String::from_utf8_lossy(&out.stdout).trim(), SPAWNS)
}

/// The exec rows measured in the same run, each against the floor.
pub struct Rows {
    pub fresh: Duration,
    pub spawn: Duration,
    pub inproc: Duration,
    pub relay: Duration,
    pub rpc: Duration,
    pub cli: Duration,
}

/// Prints the floor and each row's ratio to it with the target.
pub fn print(r: &Rows) {
    let floor = r.fresh + r.spawn;
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let ratio = |d: Duration| d.as_secs_f64() / floor.as_secs_f64();
    println!("exec floor (same run):");
    println!("  new connection + Ping/Pong:             {}", ms(r.fresh));
    println!(
        "  guest's own spawn+wait of /bin/true:    {}  (timed in the guest, {SPAWNS} spawns)",
        ms(r.spawn)
    );
    println!("  floor:                                  {}", ms(floor));
    for (name, d, target) in [
        ("exec true, in-process", r.inproc, Some(1.3)),
        ("exec true, exec relay", r.relay, None),
        ("exec true, matchlock rpc", r.rpc, Some(1.4)),
        ("matchlock exec true (CLI)", r.cli, Some(2.0)),
    ] {
        let verdict = match target {
            Some(t) if ratio(d) <= t => format!(" (target <= {t}x: met)"),
            Some(t) => format!(" (target <= {t}x: NOT met)"),
            None => String::new(),
        };
        println!("  {name:<38}  {}  {:.2}x floor{verdict}", ms(d), ratio(d));
    }
}

/// Median of `f` over the timelines (zero when none had the marks).
fn median_of(
    timelines: &[ExecTimeline],
    f: impl Fn(&ExecTimeline) -> Option<Duration>,
) -> Duration {
    crate::median(timelines.iter().filter_map(f).collect())
}

/// A guest mark difference (`b - a` microseconds) as a duration.
fn us(a: u64, b: u64) -> Duration {
    Duration::from_micros(b.saturating_sub(a))
}

/// A host segment of the timeline: its name and how to take it from one exec's marks.
type HostRow<'a> = (&'a str, &'a dyn Fn(&ExecTimeline) -> Option<Duration>);

/// Prints where an in-process `exec true` spends its time (medians per segment; issue 11's
/// "exec within its targets of the emulated floor"), host marks beside the guest's.
pub fn print_timeline(timelines: &[ExecTimeline], fresh: Duration) {
    let ms = |d: Duration| format!("{:>7.2} ms", d.as_secs_f64() * 1000.0);
    let since = |a: Instant, b: Option<Instant>| b.map(|b| b.saturating_duration_since(a));
    let host: [HostRow<'_>; 5] = [
        ("host: open the guest connection", &|t| {
            Some(t.connected - t.begin)
        }),
        ("host: write Exec", &|t| Some(t.sent - t.connected)),
        ("host: Exec written -> Started read", &|t| {
            since(t.sent, t.started)
        }),
        ("host: Started read -> Exit read", &|t| {
            t.started.and_then(|s| since(s, t.exited))
        }),
        ("host: total", &|t| since(t.begin, t.exited)),
    ];
    type GuestRow<'a> = (&'a str, fn(&GuestTiming) -> Duration);
    let guest: [GuestRow<'_>; 7] = [
        ("guest: accepted -> session thread runs", |g| {
            us(0, g.session_us)
        }),
        ("guest: session thread -> Exec read", |g| {
            us(g.session_us, g.request_us)
        }),
        ("guest: Exec read -> command spawned", |g| {
            us(g.request_us, g.spawned_us)
        }),
        ("guest: spawned -> Started written", |g| {
            us(g.spawned_us, g.started_us)
        }),
        ("guest: Started -> exit seen", |g| {
            us(g.started_us, g.exited_us)
        }),
        ("guest: exit seen -> Exit written", |g| {
            us(g.exited_us, g.exit_us)
        }),
        ("guest: total (accepted -> Exit written)", |g| {
            us(0, g.exit_us)
        }),
    ];
    println!(
        "exec timeline (in-process exec true, {} execs, medians per segment):",
        timelines.len()
    );
    for (name, f) in host {
        println!("  {name:<44} {}", ms(median_of(timelines, f)));
    }
    for (name, f) in guest {
        println!(
            "  {name:<44} {}",
            ms(median_of(timelines, |t| t.guest.as_ref().map(f)))
        );
    }
    let rest = median_of(timelines, |t| {
        let total = since(t.begin, t.exited)?;
        let guest = us(0, t.guest?.exit_us);
        Some(
            total
                .saturating_sub(t.connected - t.begin)
                .saturating_sub(guest),
        )
    });
    println!(
        "  {:<44} {}",
        "neither side (channel both ways, wake-ups)",
        ms(rest)
    );
    println!(
        "  {:<44} {}",
        "for comparison: new connection + Ping/Pong",
        ms(fresh)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_spawn_subtracts_the_empty_loop() {
        let d = per_spawn("10.00 11.20 11.30", 100).expect("parse");
        assert!((d.as_secs_f64() - 0.011).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn per_spawn_rejects_garbage() {
        assert!(per_spawn("10.00 11.20", 100).is_err());
        assert!(per_spawn("a b c", 100).is_err());
        assert!(per_spawn("10.00 10.00 10.50", 100).is_err());
    }
}
