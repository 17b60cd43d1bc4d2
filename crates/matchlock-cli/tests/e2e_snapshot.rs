//! Snapshot boot (the default) end to end with real VMs: the first run makes the snapshot,
//! later runs restore it with a fresh identity (hostname, machine id, random state, clock),
//! a broken snapshot falls back to a cold boot and is replaced, a workspace sandbox cold
//! boots, and every off switch (`--no-snapshot`, `MATCHLOCK_NO_SNAPSHOT=1`,
//! `MATCHLOCK_DEV_SNAPSHOT=0`, the vsock channel) cold boots.
//!
//! All tests share one HOME (one snapshot cache), so they run one after another under a
//! lock: each asserts on the cache's state.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{env, ok, stderr, stdout};

static SERIAL: Mutex<()> = Mutex::new(());

fn snap_cmd(args: &[&str]) -> Command {
    let mut c = env().cmd();
    c.env_remove("MATCHLOCK_DEV_SNAPSHOT")
        .env_remove("MATCHLOCK_NO_SNAPSHOT")
        .env_remove("MATCHLOCK_DEV_CHANNEL")
        .args(args);
    c
}

fn run(args: &[&str]) -> std::process::Output {
    snap_cmd(args).output().expect("spawn matchlock")
}

fn snapshots_dir() -> PathBuf {
    env().home.path().join(".cache/matchlock/snapshots")
}

/// Snapshot directories (not temporaries).
fn snapshots() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(snapshots_dir()) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn vm_log(id: &str) -> String {
    let p = env()
        .state_dir()
        .join("vms")
        .join(id)
        .join("logs")
        .join("vm.log");
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Starts a detached sandbox with the switch on; returns its id and its console log.
fn detached(extra: &[&str]) -> (String, String) {
    let mut args = vec!["run", "--image", common::IMAGE, "-d"];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let log = vm_log(&id);
    (id, log)
}

fn exec(id: &str, cmd: &str) -> String {
    ok(&run(&["exec", id, "--", "sh", "-c", cmd]))
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes sure a snapshot for the default layout exists (the first test to run makes it).
fn ensure_snapshot() {
    if snapshots().is_empty() {
        let out = run(&["run", "--image", common::IMAGE, "--", "true"]);
        assert!(out.status.success(), "first run: {}", stderr(&out));
    }
    assert_eq!(snapshots().len(), 1, "one snapshot: {:?}", snapshots());
}

#[test]
fn first_run_makes_the_snapshot_and_later_runs_restore_it() {
    let _l = lock();
    for s in snapshots() {
        std::fs::remove_dir_all(s).expect("clear cache");
    }
    let (id, log) = detached(&[]);
    let _g = env().guard(&id);
    assert!(
        log.contains("matchlock: made snapshot"),
        "first run made it: {log}"
    );
    assert!(log.contains("matchlock: restored from snapshot"), "{log}");
    let snaps = snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    use std::os::unix::fs::PermissionsExt;
    for f in ["ram", "state"] {
        let m = std::fs::metadata(snaps[0].join(f)).expect("snapshot file");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let dir_mode = std::fs::metadata(&snaps[0])
        .expect("dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o077, 0, "snapshot dir private");
    assert_eq!(exec(&id, "echo hi; hostname").trim(), format!("hi\n{id}"));

    // The second run restores without making a new one; exit codes come through.
    let out = run(&[
        "run",
        "--image",
        common::IMAGE,
        "--",
        "sh",
        "-c",
        "echo restored; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "restored");
    let (id2, log2) = detached(&[]);
    let _g2 = env().guard(&id2);
    assert!(!log2.contains("made snapshot"), "{log2}");
    assert!(log2.contains("matchlock: restored from snapshot"), "{log2}");
    // The QEMU of a restored sandbox was started to load state.
    let dir = env().state_dir().join("vms").join(&id2);
    let qemu = common::pids_matching(&dir.join("chan.sock").to_string_lossy());
    let cmdline = qemu
        .iter()
        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .find(|c| c.contains("qemu-system"))
        .expect("QEMU of the restored sandbox");
    assert!(cmdline.contains("-incoming defer"), "{cmdline}");
    assert!(cmdline.contains("share=off"), "{cmdline}");
    // Its guest RAM is its own copy (unlinked once mapped), never the cached file: QEMU
    // 7.2 opens a RAM file read-write, and the cache must stay out of its reach.
    let pid = qemu
        .iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        })
        .expect("QEMU pid");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let own = format!("{} (deleted)", dir.join("ram").display());
    assert!(
        maps.lines().any(|l| l.ends_with(&own)),
        "RAM copy mapped: {maps}"
    );
    let cache = snapshots_dir();
    assert!(
        !maps.contains(&*cache.to_string_lossy()),
        "cache mapped: {maps}"
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            assert!(
                !target.starts_with(&cache),
                "QEMU holds {}",
                target.display()
            );
        }
    }
    assert!(!dir.join("ram").exists(), "the copy's name is removed");
    assert_eq!(snapshots().len(), 1);
    env().kill_and_rm(&id2);
    env().kill_and_rm(&id);
}

#[test]
fn restored_sandboxes_get_fresh_identities() {
    let _l = lock();
    ensure_snapshot();
    // Two at once from the same snapshot.
    let a = std::thread::spawn(|| detached(&["--hostname", "alpha"]));
    let b = std::thread::spawn(|| detached(&["--hostname", "beta"]));
    let (ida, loga) = a.join().expect("a");
    let (idb, logb) = b.join().expect("b");
    let _ga = env().guard(&ida);
    let _gb = env().guard(&idb);
    assert!(loga.contains("restored from snapshot"), "{loga}");
    assert!(logb.contains("restored from snapshot"), "{logb}");
    let probe = "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat /etc/machine-id";
    let ra = exec(&ida, probe);
    let rb = exec(&idb, probe);
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let la: Vec<&str> = ra.lines().collect();
    let lb: Vec<&str> = rb.lines().collect();
    assert_eq!(la[0], "alpha");
    assert_eq!(lb[0], "beta");
    assert_eq!(la[1].len(), 64, "{ra}");
    assert_ne!(la[1], lb[1], "random bytes differ between restores");
    for l in [&la, &lb] {
        assert!(
            l[3].len() == 32 && l[3].bytes().all(|b| b.is_ascii_hexdigit()),
            "machine-id {:?}",
            l[3]
        );
    }
    assert_ne!(la[3], lb[3], "machine ids differ between restores");
    for l in [&la, &lb] {
        let t: u64 = l[2].trim().parse().expect("date");
        assert!(
            t.abs_diff(host_now) <= 3,
            "guest clock {t} vs host {host_now}"
        );
    }
    env().kill_and_rm(&ida);
    env().kill_and_rm(&idb);
}

#[test]
fn network_and_port_forward_work_after_restore() {
    let _l = lock();
    ensure_snapshot();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    let spec = format!("{port}:7000");
    let (id, log) = detached(&["-p", &spec]);
    let _g = env().guard(&id);
    assert!(log.contains("restored from snapshot"), "{log}");
    let ip = exec(&id, "ip -4 addr show eth0 | grep -c inet");
    assert_eq!(ip.trim(), "1", "eth0 configured from the boot config");
    let mut server = snap_cmd(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "while true; do nc -l -p 7000 -e rev; done",
    ])
    .stdout(std::process::Stdio::null())
    .spawn()
    .expect("server");
    assert_eq!(common::forward_roundtrip(port, "abc\n"), "cba\n");
    let _ = server.kill();
    let _ = server.wait();
    env().kill_and_rm(&id);
}

#[test]
fn broken_snapshot_falls_back_to_cold_boot_and_is_replaced() {
    let _l = lock();
    ensure_snapshot();
    let snap = snapshots().remove(0);
    // Garbage device state of the right size class: QEMU refuses to load it.
    std::fs::write(snap.join("state"), b"QEVM garbage, not a migration stream").expect("corrupt");
    let (id, log) = detached(&[]);
    let _g = env().guard(&id);
    assert!(log.contains("snapshot boot failed, cold boot"), "{log}");
    assert_eq!(exec(&id, "echo alive").trim(), "alive");
    env().kill_and_rm(&id);
    assert!(
        snapshots().is_empty(),
        "broken snapshot removed: {:?}",
        snapshots()
    );

    // Next run makes a new one; then a truncated RAM file is refused before QEMU starts.
    let (id, log) = detached(&[]);
    assert!(log.contains("made snapshot"), "{log}");
    env().kill_and_rm(&id);
    let snap = snapshots().remove(0);
    let ram = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("ram"))
        .expect("ram");
    ram.set_len(4096).expect("truncate");
    let (id, log) = detached(&[]);
    assert!(
        log.contains("made snapshot"),
        "truncated one replaced: {log}"
    );
    assert_eq!(exec(&id, "echo ok").trim(), "ok");
    env().kill_and_rm(&id);
    assert_eq!(snapshots().len(), 1);
}

#[test]
fn every_off_switch_cold_boots() {
    let _l = lock();
    ensure_snapshot();
    /// Extra `run` flags and an environment variable.
    type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>);
    let cases: [Case; 4] = [
        (&["--no-snapshot"], None),
        (&[], Some(("MATCHLOCK_NO_SNAPSHOT", "1"))),
        (&[], Some(("MATCHLOCK_DEV_SNAPSHOT", "0"))),
        (&[], Some(("MATCHLOCK_DEV_CHANNEL", "vsock"))),
    ];
    for (flags, var) in cases {
        let mut args = vec!["run", "--image", common::IMAGE, "-d"];
        args.extend_from_slice(flags);
        let mut c = snap_cmd(&args);
        if let Some((k, v)) = var {
            c.env(k, v);
        }
        let out = c.output().expect("spawn");
        assert!(out.status.success(), "{flags:?} {var:?}: {}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        let _g = env().guard(&id);
        let log = vm_log(&id);
        assert!(!log.contains("snapshot"), "{flags:?} {var:?}: {log}");
        assert_eq!(exec(&id, "echo cold").trim(), "cold");
        env().kill_and_rm(&id);
    }
    assert_eq!(snapshots().len(), 1);
}

#[test]
fn workspace_sandbox_cold_boots() {
    let _l = lock();
    let ws = tempfile::tempdir().expect("workspace");
    std::fs::write(ws.path().join("f.txt"), "from host").expect("write");
    let before = snapshots();
    let vol = format!("{}:/workspace/data", ws.path().display());
    let (id, log) = detached(&["--workspace", "/workspace", "-v", &vol]);
    let _g = env().guard(&id);
    assert!(!log.contains("snapshot"), "{log}");
    assert_eq!(exec(&id, "cat /workspace/data/f.txt"), "from host");
    assert_eq!(snapshots(), before, "no snapshot for a workspace sandbox");
    env().kill_and_rm(&id);
}

/// Pids of the processes recorded for `id` (its lifecycle record, through `inspect`).
fn recorded_pids(id: &str) -> Vec<u64> {
    let out = ok(&run(&["inspect", id]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
    v["lifecycle"]["resources"]["processes"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn first_runs_at_once_make_one_snapshot() {
    let _l = lock();
    for s in snapshots() {
        std::fs::remove_dir_all(s).expect("clear cache");
    }
    // Without one maker per key each would cold boot and save its own snapshot (measured:
    // 48 at once all failed to start); now one makes it, the others cold boot (or restore
    // if it is already there).
    let handles: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(|| detached(&[])))
        .collect();
    let started: Vec<(String, String)> = handles
        .into_iter()
        .map(|h| h.join().expect("run -d"))
        .collect();
    let _guards: Vec<_> = started.iter().map(|(id, _)| env().guard(id)).collect();
    let makers = started
        .iter()
        .filter(|(_, log)| log.contains("made snapshot"))
        .count();
    assert_eq!(makers, 1, "exactly one maker: {started:#?}");
    for (id, log) in &started {
        assert!(
            log.contains("restored from snapshot")
                || log.contains("snapshot being made by another sandbox, cold boot"),
            "{log}"
        );
        assert!(!log.contains("snapshot boot failed"), "{log}");
        assert_eq!(exec(id, "echo up").trim(), "up");
        // The maker's own VM was killed after the save: only live processes stay recorded.
        let pids = recorded_pids(id);
        assert!(!pids.is_empty(), "no process recorded for {id}");
        for pid in pids {
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "{id} records exited process {pid}"
            );
        }
    }
    assert_eq!(snapshots().len(), 1, "{:?}", snapshots());
    let leftovers: Vec<_> = std::fs::read_dir(snapshots_dir())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && !n.starts_with(".lock-"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
    // A later run restores it.
    let (id, log) = detached(&[]);
    let _g = env().guard(&id);
    assert!(log.contains("restored from snapshot"), "{log}");
    for (id, _) in &started {
        env().kill_and_rm(id);
    }
    env().kill_and_rm(&id);
}
