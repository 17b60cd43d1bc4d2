//! Images end to end: layers flattened (whiteouts, opaque dirs, setuid, owners, links) and the
//! image config (ENTRYPOINT, CMD, ENV, WORKDIR, USER) honoured with Docker semantics.

mod common;

use common::{env, ok, stderr};
use matchlock_test_support::{busybox_spec, Entry};

fn import(tag: &str, spec: &matchlock_test_support::ImageSpec) {
    let out = env().run_stdin(&["image", "import", tag], &spec.docker_save());
    let text = ok(&out);
    assert!(text.contains(&format!("Imported: {tag}")), "{text}");
}

#[test]
fn layers_are_flattened_faithfully() {
    let mut spec = busybox_spec().expect("busybox");
    spec.layers.push(vec![
        Entry::dir("data").mode(0o755),
        Entry::file("data/keep", "keep"),
        Entry::file("data/gone", "gone"),
        Entry::dir("opq"),
        Entry::file("opq/lower", "lower"),
        Entry::file("usr/local/bin/suid", "#!/bin/sh\necho suid\n").mode(0o4755),
        Entry::file("usr/local/bin/sgid", "x")
            .mode(0o2755)
            .owner(1000, 50),
        Entry::dir("sticky").mode(0o1777),
        Entry::symlink("data/link", "/data/keep"),
        Entry::hardlink("data/hard", "data/keep"),
    ]);
    spec.layers.push(vec![
        Entry::whiteout("data/gone"),
        Entry::opaque("opq"),
        Entry::file("opq/upper", "upper"),
    ]);
    import("layers:test", &spec);
    let script = "ls /data | tr '\\n' ' '; echo; ls /opq; stat -c '%a %u:%g' /usr/local/bin/suid /usr/local/bin/sgid /sticky; \
                  readlink /data/link; stat -c %h /data/keep; cat /data/hard";
    let out = ok(&env().run(&["run", "--image", "layers:test", "--", "sh", "-c", script]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "hard keep link", "{out}");
    assert_eq!(lines[1], "upper", "{out}");
    assert_eq!(lines[2], "4755 0:0", "{out}");
    assert_eq!(lines[3], "2755 1000:50", "{out}");
    assert_eq!(lines[4], "1777 0:0", "{out}");
    assert_eq!(lines[5], "/data/keep", "{out}");
    assert_eq!(lines[6], "2", "{out}");
    assert_eq!(lines[7], "keep", "{out}");
}

#[test]
fn image_config_follows_docker_semantics() {
    let mut spec = busybox_spec().expect("busybox");
    spec.config.entrypoint = vec!["sh".into(), "-c".into()];
    spec.config.cmd = vec!["echo default-cmd $IMG_VAR $(pwd) $(id -un)".into()];
    spec.config.env.push("IMG_VAR=from-image".into());
    spec.config.working_dir = "/home/app".into();
    spec.config.user = "app".into();
    import("config:test", &spec);
    let e = env();
    let out = ok(&e.run(&["run", "--image", "config:test"]));
    assert_eq!(out.trim(), "default-cmd from-image /home/app app");
    // Args replace CMD but keep ENTRYPOINT; -e overrides image ENV; -u and -w override.
    let out = ok(&e.run(&[
        "run",
        "--image",
        "config:test",
        "-e",
        "IMG_VAR=flag",
        "-u",
        "root",
        "-w",
        "/",
        "echo $IMG_VAR $(pwd) $(id -un)",
    ]));
    assert_eq!(out.trim(), "flag / root");
    // --entrypoint replaces it; "" clears it.
    let out = ok(&e.run(&[
        "run",
        "--image",
        "config:test",
        "--entrypoint",
        "echo",
        "hi",
    ]));
    assert_eq!(out.trim(), "hi");
    let out = ok(&e.run(&[
        "run",
        "--image",
        "config:test",
        "--entrypoint",
        "",
        "--",
        "echo",
        "cleared",
    ]));
    assert_eq!(out.trim(), "cleared");
}

#[test]
fn bad_archives_are_rejected_and_nothing_is_stored() {
    let e = env();
    for (name, data) in [
        ("garbage", b"this is not a tar archive at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        let o = e.run_stdin(&["image", "import", &format!("bad-{name}:test")], &data);
        assert!(!o.status.success(), "{name} must be rejected");
        assert!(!stderr(&o).is_empty());
    }
    let mut good = busybox_spec().expect("busybox").docker_save();
    good.truncate(good.len() / 2);
    let o = e.run_stdin(&["image", "import", "bad-truncated:test"], &good);
    assert!(!o.status.success(), "truncated archive must be rejected");
    let ls = ok(&e.run(&["image", "ls"]));
    assert!(!ls.contains("bad-"), "{ls}");
}
