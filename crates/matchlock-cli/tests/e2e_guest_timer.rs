//! The guest's clock and timer after boot (issue 11): the boot's timer check ran before
//! `Ready`, the guest keeps the TSC clocksource (`tsc=reliable` under TCG), timer interrupts
//! tick and sleeps return, and no ext4 background thread is left running into the first
//! command. One detached VM shared by the checks.

mod common;

use std::time::{Duration, Instant};

use common::{ok, stdout};

#[test]
fn guest_timer_and_clock_after_boot() {
    let e = common::env();
    let id = e.detached(&[]);
    let _guard = e.guard(&id);

    // First command right after Ready: the upper disk's mount must not have started
    // ext4lazyinit (bitmap prefetch), which would run into this command's time.
    let threads = ok(&e.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cat /proc/[0-9]*/comm 2>/dev/null; true",
    ]));
    assert!(
        !threads.lines().any(|l| l.trim() == "ext4lazyinit"),
        "ext4lazyinit running after boot:\n{threads}"
    );

    // The boot's timer check ran, and before `ready`.
    let log = std::fs::read_to_string(e.state_dir().join("vms").join(&id).join("logs/vm.log"))
        .expect("vm.log");
    let tick = log
        .find("timer interrupts tick")
        .unwrap_or_else(|| panic!("no timer check line in vm.log:\n{log}"));
    let ready = log.find(" ready ").expect("ready line");
    assert!(tick < ready, "timer check after ready:\n{log}");

    let clock = ok(&e.run(&[
        "exec",
        &id,
        "--",
        "cat",
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    ]));
    assert!(
        !clock.contains("jiffies"),
        "guest fell back to a jiffies clocksource: {clock}"
    );
    let dmesg = stdout(&e.run(&["exec", &id, "--", "dmesg"]));
    assert!(
        !dmesg.contains("TSC found unstable"),
        "clocksource watchdog fired:\n{dmesg}"
    );

    let t = Instant::now();
    let out = ok(&e.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "sleep 0.3; grep LOC: /proc/interrupts",
    ]));
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let loc: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no LOC count in {out:?}"));
    assert!(loc > 0, "no local timer interrupts: {out}");
}
