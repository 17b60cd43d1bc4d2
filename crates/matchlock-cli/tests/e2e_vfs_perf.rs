//! The workspace server under descriptor pressure, on real VMs: what a guest sees when the
//! owner's hard open-file limit runs out (the server holds one `O_PATH` descriptor per host
//! inode the guest has looked up).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{env, stderr, stdout, IMAGE};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// An owner whose hard open-file limit is low (200, which the server cannot raise) serves a
/// guest that creates files until one fails: the failure is a prompt, clear "Too many open
/// files" for that file (not a hang), the owner logs why, and once the guest drops its
/// caches (forgetting the inodes, so the server closes their descriptors) the workspace
/// serves again: every file made before the failure is listed, and (the listing looked them
/// all up again, so after another drop) the first and last are readable.
#[test]
fn past_the_hard_open_file_limit_the_guest_gets_emfile_and_recovers() {
    let e = env();
    let tmp = tempfile::tempdir().expect("tmp");
    let ws = format!("{}:/workspace:host_fs", s(tmp.path()));
    let mut c = e.cmd_with_ulimit("-n 200");
    c.args([
        "run",
        "--privileged",
        "--image",
        IMAGE,
        "--workspace",
        "/workspace",
        "-v",
        &ws,
        "--",
    ])
    .args([
        "sh",
        "-c",
        "mkdir /workspace/d && i=0; while [ $i -lt 1000 ]; do \
             { echo x > /workspace/d/f$i; } 2>/tmp/err || break; i=$((i+1)); done; \
             echo made $i; cat /tmp/err; \
             echo 2 > /proc/sys/vm/drop_caches; sleep 1; \
             echo listed $(ls /workspace/d | wc -l); \
             echo 2 > /proc/sys/vm/drop_caches; sleep 1; \
             echo read $(cat /workspace/d/f0 /workspace/d/f$((i-1)) | wc -l)",
    ])
    .stdin(Stdio::null());
    let t = Instant::now();
    let o = c.output().expect("spawn");
    let took = t.elapsed();
    let out = stdout(&o);
    let err = stderr(&o);
    assert!(o.status.success(), "{out}{err}");
    let made: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("made ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count: {out}"));
    assert!(
        (20..1000).contains(&made),
        "the limit should stop the guest part way: made {made}: {out}"
    );
    assert!(out.contains("Too many open files"), "{out}{err}");
    assert!(err.contains("open-file limit is reached"), "{out}{err}");
    // The create that failed may have made its (empty) file before the server's lookup of
    // it ran out of descriptors: then the host has one more, and the guest's listing, which
    // needs one descriptor per entry again, may or may not get to it.
    let on_host = std::fs::read_dir(tmp.path().join("d")).expect("ls").count();
    assert!(
        on_host == made || on_host == made + 1,
        "{on_host} on the host, {out}"
    );
    let listed: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("listed ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no listing: {out}{err}"));
    assert!((made..=on_host).contains(&listed), "{out}{err}");
    assert!(out.contains("read 2"), "{out}{err}");
    assert!(took < Duration::from_secs(120), "took {took:?} (a hang?)");
    eprintln!("made {made} files before the limit; the run took {took:?}");
}
