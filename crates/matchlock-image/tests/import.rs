//! Import tests on synthetic archives; squashfs content is checked through `sqfs2tar`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use matchlock_image::{
    ArchiveError, FlattenError, ImageLimits, ImageStore, ImportError, LayerError, StoreError,
};
use matchlock_test_support::{busybox_image, ConfigSpec, Entry, ImageSpec};

#[derive(Debug, Default, Clone)]
struct Item {
    ty: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    dev: Option<(u32, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
    content: Vec<u8>,
}

/// Everything in a squashfs, read back through `sqfs2tar`.
fn sqfs_items(path: &Path) -> BTreeMap<String, Item> {
    let out = Command::new("sqfs2tar")
        .arg(path)
        .output()
        .expect("run sqfs2tar (squashfs-tools-ng)");
    assert!(
        out.status.success(),
        "sqfs2tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ar = tar::Archive::new(out.stdout.as_slice());
    let mut items = BTreeMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = String::from_utf8_lossy(&e.path_bytes())
            .trim_end_matches('/')
            .to_owned();
        let h = e.header().clone();
        let mut it = Item {
            ty: char::from(h.entry_type().as_byte()),
            mode: h.mode().expect("mode") & 0o7777,
            uid: h.uid().expect("uid"),
            gid: h.gid().expect("gid"),
            mtime: h.mtime().expect("mtime"),
            link: e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            dev: h
                .device_major()
                .ok()
                .flatten()
                .zip(h.device_minor().ok().flatten()),
            ..Default::default()
        };
        if let Some(exts) = e.pax_extensions().expect("pax") {
            for x in exts {
                let x = x.expect("pax record");
                if let Some(k) = x.key().expect("key").strip_prefix("SCHILY.xattr.") {
                    it.xattrs.insert(k.to_owned(), x.value_bytes().to_vec());
                }
            }
        }
        e.read_to_end(&mut it.content).expect("content");
        items.insert(name, it);
    }
    items
}

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ImageStore::open(&dir.path().join("images")).expect("open store");
    (dir, s)
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

/// Asserts nothing was stored: no row, no rootfs, no temp files left.
fn assert_nothing_stored(s: &ImageStore, tag: &str) {
    assert!(s.get(tag).expect("get").is_none());
    assert!(s.list().expect("list").is_empty());
    assert_eq!(
        files_in(&s.root().join("rootfs")),
        0,
        "rootfs dir not empty"
    );
    assert_eq!(files_in(&s.root().join("tmp")), 0, "temp files left");
}

fn rich_layers() -> Vec<Vec<Entry>> {
    let long = format!("deep/{}/file.txt", "d".repeat(120));
    vec![
        vec![
            Entry::dir("bin"),
            Entry::file("bin/su", "suid").mode(0o4755),
            Entry::file("bin/sgid", "sgid").mode(0o2755).owner(0, 50),
            Entry::dir("home"),
            Entry::dir("home/app").owner(1000, 1000).mode(0o750),
            Entry::file("home/app/secret", "s3cret")
                .owner(1000, 1000)
                .mode(0o600)
                .mtime(1_600_000_000),
            Entry::file("/etc/abs-path", "abs"),
            Entry::symlink("bin/sh", "/bin/busybox"),
            Entry::symlink("rel", "../up/there"),
            Entry::file("bin/orig", "linked content"),
            Entry::hardlink("bin/hl", "/bin/orig"),
            Entry::file("bin/pair-a", "pair").mode(0o4711),
            Entry::hardlink("./bin/pair-b", "./bin/pair-a"),
            Entry::file("caps", "c").xattr("user.foo", b"bar").xattr(
                "security.capability",
                &[
                    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            ),
            Entry::file("acl", "a")
                .xattr("system.posix_acl_access", &[2, 0, 0, 0])
                .xattr("trusted.t", b"1"),
            Entry::dir("dev"),
            Entry::char_dev("dev/null", 1, 3),
            Entry::block_dev("dev/sda", 8, 0),
            Entry::fifo("dev/fifo"),
            Entry::dir("tmp").mode(0o1777),
            Entry::dir("gone"),
            Entry::file("gone/a", "a"),
            Entry::dir("opq"),
            Entry::file("opq/lower", "lower"),
            Entry::file("replaced", "old"),
            Entry::file(&long, "long path"),
        ],
        vec![
            Entry::whiteout("gone"),
            Entry::opaque("opq"),
            Entry::file("opq/upper", "upper"),
            Entry::file("replaced", "new"),
            Entry::whiteout("bin/orig"),
        ],
    ]
}

fn rich_spec() -> ImageSpec {
    ImageSpec {
        layers: rich_layers(),
        config: ConfigSpec {
            env: vec![
                "PATH=/usr/bin:/bin".into(),
                "EQ=a=b".into(),
                "NOVALUE".into(),
            ],
            cmd: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            entrypoint: vec!["/entry".into()],
            working_dir: "/home/app".into(),
            user: "app".into(),
        },
        ..Default::default()
    }
}

fn check_rich(rootfs: &Path) {
    let items = sqfs_items(rootfs);
    let get = |p: &str| {
        items
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing; have {:?}", items.keys().collect::<Vec<_>>()))
    };
    assert_eq!(get("bin/su").mode, 0o4755);
    assert_eq!((get("bin/sgid").mode, get("bin/sgid").gid), (0o2755, 50));
    let home = get("home/app");
    assert_eq!(
        (home.ty, home.uid, home.gid, home.mode),
        ('5', 1000, 1000, 0o750)
    );
    let secret = get("home/app/secret");
    assert_eq!(
        (secret.uid, secret.mode, secret.mtime),
        (1000, 0o600, 1_600_000_000)
    );
    assert_eq!(secret.content, b"s3cret");
    assert_eq!(get("etc/abs-path").content, b"abs");
    assert_eq!(
        (get("bin/sh").ty, get("bin/sh").link.as_deref()),
        ('2', Some("/bin/busybox"))
    );
    assert_eq!(get("rel").link.as_deref(), Some("../up/there"));
    // The hard link survives the whiteout of its original name.
    assert!(!items.contains_key("bin/orig"));
    assert_eq!(get("bin/hl").content, b"linked content");
    // A surviving pair stays one inode: one file plus a hard link to it.
    assert_eq!(
        (get("bin/pair-a").ty, get("bin/pair-a").mode),
        ('0', 0o4711)
    );
    assert_eq!(
        (get("bin/pair-b").ty, get("bin/pair-b").link.as_deref()),
        ('1', Some("bin/pair-a"))
    );
    assert_eq!(
        get("caps").xattrs.get("user.foo").map(Vec::as_slice),
        Some(&b"bar"[..])
    );
    assert!(get("caps").xattrs.contains_key("security.capability"));
    assert_eq!(
        (get("dev/null").ty, get("dev/null").dev),
        ('3', Some((1, 3)))
    );
    assert_eq!((get("dev/sda").ty, get("dev/sda").dev), ('4', Some((8, 0))));
    assert_eq!(get("dev/fifo").ty, '6');
    assert_eq!(get("tmp").mode, 0o1777);
    assert!(
        !items.keys().any(|k| k == "gone" || k.starts_with("gone/")),
        "whiteout not applied"
    );
    assert!(!items.contains_key("opq/lower"), "opaque dir not applied");
    assert_eq!(get("opq/upper").content, b"upper");
    assert_eq!(get("replaced").content, b"new");
    assert!(
        !items.keys().any(|k| k.contains(".wh.")),
        "whiteout markers leaked"
    );
    let long = format!("deep/{}/file.txt", "d".repeat(120));
    assert_eq!(get(&long).content, b"long path");
}

#[test]
fn docker_save_import_preserves_everything() {
    let (_d, s) = store();
    let rec = s
        .import_archive("rich:latest", rich_spec().docker_save().as_slice())
        .expect("import");
    assert_eq!(rec.layers.len(), 2);
    assert!(rec.digest.starts_with("sha256:") && rec.digest.len() == 71);
    assert_eq!(rec.source, "import");
    assert!(rec.size_bytes > 0);
    assert_eq!(rec.config.cmd, vec!["/bin/sh", "-c", "true"]);
    assert_eq!(rec.config.entrypoint, vec!["/entry"]);
    assert_eq!(rec.config.user, "app");
    assert_eq!(rec.config.working_dir, "/home/app");
    assert_eq!(
        rec.config.env,
        [
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("EQ".to_string(), "a=b".to_string())
        ]
        .into()
    );
    check_rich(&rec.rootfs);
    let got = s.get("rich:latest").expect("get").expect("present");
    assert_eq!(got, rec);
    for l in &rec.layers {
        let hex = l.strip_prefix("sha256:").expect("prefix");
        assert!(s.root().join(format!("layers/sha256/{hex}.tar")).is_file());
    }
    assert_eq!(files_in(&s.root().join("tmp")), 0);
}

#[test]
fn gzip_layers_and_docker_blobs_layout_and_gzipped_archive() {
    let (_d, s) = store();
    let spec = ImageSpec {
        gzip: true,
        docker_blobs: true,
        ..rich_spec()
    };
    let rec = s
        .import_archive("blobs", spec.docker_save().as_slice())
        .expect("import");
    check_rich(&rec.rootfs);
    // The whole archive gzip'd (`docker save | gzip`).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&rich_spec().docker_save()).expect("gzip");
    let rec2 = s
        .import_archive("gz", gz.finish().expect("gzip").as_slice())
        .expect("import gz");
    // Same layers => same diff ids => one shared rootfs file.
    assert_eq!(rec2.rootfs, rec.rootfs);
    assert_eq!(files_in(&s.root().join("rootfs")), 1);
}

#[test]
fn oci_layout_picks_linux_amd64() {
    let (_d, s) = store();
    let spec = ImageSpec {
        gzip: true,
        extra_arm64: true,
        ..rich_spec()
    };
    let rec = s
        .import_archive("oci", spec.oci_layout().as_slice())
        .expect("import");
    assert_eq!(
        rec.config.cmd,
        vec!["/bin/sh", "-c", "true"],
        "picked the arm64 manifest"
    );
    check_rich(&rec.rootfs);
}

#[test]
fn diff_id_mismatch_stores_nothing() {
    let (_d, s) = store();
    let spec = ImageSpec {
        corrupt_diff_id: Some(1),
        ..rich_spec()
    };
    let err = s
        .import_archive("bad", spec.docker_save().as_slice())
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            ImportError::Layer {
                index: 1,
                source: LayerError::DiffId { .. }
            }
        ),
        "{err:?}"
    );
    assert_nothing_stored(&s, "bad");
}

#[test]
fn oci_blob_corruption_rejected() {
    let (_d, s) = store();
    let spec = ImageSpec {
        corrupt_blob: Some(0),
        ..rich_spec()
    };
    let err = s
        .import_archive("bad", spec.oci_layout().as_slice())
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            ImportError::Layer {
                index: 0,
                source: LayerError::BlobDigest { .. } | LayerError::Decompress { .. }
            }
        ),
        "{err:?}"
    );
    assert_nothing_stored(&s, "bad");
}

#[test]
fn traversal_entries_rejected_and_never_touch_host() {
    let (d, s) = store();
    let marker = d.path().join("escaped");
    let rel = format!(
        "{}{}/escaped",
        "../".repeat(40),
        d.path().display().to_string().trim_start_matches('/')
    );
    let hostile: Vec<Vec<Vec<Entry>>> = vec![
        vec![vec![Entry::file(&rel, "x")]],
        vec![vec![
            Entry::symlink("etc", &d.path().display().to_string()),
            Entry::file("etc/escaped", "x"),
        ]],
        vec![vec![
            Entry::file("etc", "file"),
            Entry::file("etc/passwd", "x"),
        ]],
        vec![vec![Entry::hardlink("h", "/../../etc/shadow")]],
        vec![vec![Entry::hardlink("h", "does/not/exist")]],
        vec![vec![
            Entry::file("f", "x").xattr("user.big", &vec![b'v'; (1 << 20) + 1])
        ]],
    ];
    for (i, layers) in hostile.into_iter().enumerate() {
        let err = s
            .import_archive("evil", ImageSpec::new(layers).docker_save().as_slice())
            .expect_err("must fail");
        assert!(matches!(err, ImportError::Flatten(_)), "case {i}: {err:?}");
        if let ImportError::Flatten(f) = &err {
            let ok = match i {
                0 => matches!(f, FlattenError::DotDot { .. }),
                1 | 2 => matches!(f, FlattenError::ParentNotDir { .. }),
                3 => matches!(f, FlattenError::LinkEscapes { .. }),
                4 => matches!(f, FlattenError::MissingLinkTarget { .. }),
                _ => matches!(f, FlattenError::ExtHeaderTooLarge { .. }),
            };
            assert!(ok, "case {i}: {f:?}");
        }
        assert_nothing_stored(&s, "evil");
        assert!(!marker.exists(), "case {i} wrote to the host");
    }
    // Outer archive members with '..' are rejected too.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(1);
    h.set_cksum();
    b.append(&h, &b"x"[..]).expect("append");
    let err = s
        .import_archive("evil", b.into_inner().expect("tar").as_slice())
        .expect_err("must fail");
    assert!(
        matches!(
            err,
            ImportError::Archive(ArchiveError::BadMemberPath { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn garbage_and_truncated_input_rejected() {
    let (_d, s) = store();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        (
            "text",
            b"this is not a tar archive at all, just some words\n".repeat(20),
        ),
        ("truncated", {
            let full = rich_spec().docker_save();
            full[..full.len() / 2].to_vec()
        }),
        ("bad gzip", vec![0x1f, 0x8b, 0, 1, 2, 3]),
    ];
    for (name, bytes) in cases {
        let err = s.import_archive("junk", bytes.as_slice()).expect_err(name);
        assert!(
            matches!(err, ImportError::Archive(_) | ImportError::Layer { .. }),
            "{name}: {err:?}"
        );
        assert_nothing_stored(&s, "junk");
    }
}

#[test]
fn reimport_replaces_and_prunes_old_rootfs() {
    let (_d, s) = store();
    let a = ImageSpec::new(vec![vec![Entry::file("v", "1")]]);
    let b = ImageSpec::new(vec![vec![Entry::file("v", "2")]]);
    let ra = s
        .import_archive("t", a.docker_save().as_slice())
        .expect("a");
    let rb = s
        .import_archive("t", b.docker_save().as_slice())
        .expect("b");
    assert_ne!(ra.digest, rb.digest);
    let list = s.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].digest, rb.digest);
    assert!(!ra.rootfs.exists(), "old rootfs should be pruned");
    assert_eq!(sqfs_items(&rb.rootfs)["v"].content, b"2");
}

#[test]
fn list_order_remove_twice_and_gc() {
    let (_d, s) = store();
    for (tag, v) in [("one", "1"), ("two", "2")] {
        s.import_archive(
            tag,
            ImageSpec::new(vec![vec![Entry::file("v", v)]])
                .docker_save()
                .as_slice(),
        )
        .expect("import");
    }
    let tags: Vec<String> = s.list().expect("list").into_iter().map(|r| r.tag).collect();
    assert_eq!(tags, vec!["two", "one"]);
    s.remove("one").expect("first remove");
    let err = s.remove("one").expect_err("second remove");
    assert!(matches!(err, StoreError::NotFound { .. }));
    assert_eq!(err.to_string(), "image not found: \"one\"");
    assert_eq!(
        files_in(&s.root().join("rootfs")),
        1,
        "remove prunes its rootfs"
    );
    assert_eq!(s.gc().expect("gc"), 0);
    // Leftovers of a crashed import: a temp file, an orphan layer and an orphan rootfs.
    std::fs::write(s.root().join("tmp/layer-crash.tmp"), "x").expect("write");
    std::fs::write(
        s.root()
            .join(format!("layers/sha256/{}.tar", "0".repeat(64))),
        "x",
    )
    .expect("write");
    std::fs::write(
        s.root().join(format!("rootfs/{}.sqfs", "1".repeat(64))),
        "x",
    )
    .expect("write");
    assert_eq!(s.gc().expect("gc"), 3);
    assert!(
        s.get("two").expect("get").is_some(),
        "gc must keep referenced files"
    );
}

#[test]
fn missing_files_make_a_miss() {
    let (_d, s) = store();
    let rec = s
        .import_archive(
            "m",
            ImageSpec::new(vec![vec![Entry::file("v", "1")]])
                .docker_save()
                .as_slice(),
        )
        .expect("import");
    std::fs::remove_file(&rec.rootfs).expect("rm rootfs");
    assert!(s.get("m").expect("get").is_none());
    // Re-import heals it.
    s.import_archive(
        "m",
        ImageSpec::new(vec![vec![Entry::file("v", "1")]])
            .docker_save()
            .as_slice(),
    )
    .expect("reimport");
    assert!(s.get("m").expect("get").is_some());
}

#[test]
fn store_reopens_with_existing_db() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("images");
    {
        let s = ImageStore::open(&root).expect("open");
        s.import_archive(
            "keep",
            ImageSpec::new(vec![vec![Entry::file("v", "1")]])
                .docker_save()
                .as_slice(),
        )
        .expect("import");
    }
    let s = ImageStore::open(&root).expect("reopen");
    assert_eq!(s.list().expect("list").len(), 1);
}

#[test]
fn busybox_image_imports_with_shell() {
    let (_d, s) = store();
    let mut archive = Vec::new();
    busybox_image(&mut archive).expect("busybox-static must be installed");
    let rec = s
        .import_archive("busybox:latest", archive.as_slice())
        .expect("import");
    assert_eq!(rec.config.cmd, vec!["/bin/sh"]);
    let items = sqfs_items(&rec.rootfs);
    assert_eq!(items["bin/sh"].link.as_deref(), Some("busybox"));
    assert_eq!(items["bin/busybox"].mode, 0o755);
    assert!(
        String::from_utf8_lossy(&items["etc/os-release"].content).contains("ID=matchlock-busybox")
    );
    assert_eq!((items["home/app"].uid, items["home/app"].gid), (1000, 1000));
    assert_eq!(items["root"].mode, 0o700);
}

fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("parse Uid line")
}

/// Importing needs no privileges: run as an unprivileged user (re-executing this test as
/// `nobody` via `setpriv` when we are root) and import an image full of setuid files,
/// foreign owners and device nodes.
#[test]
fn unprivileged_import() {
    const ENV: &str = "MATCHLOCK_IMAGE_TEST_UNPRIV_STORE";
    if let Some(root) = std::env::var_os(ENV) {
        assert_ne!(effective_uid(), 0, "child must not run as root");
        let s = ImageStore::open(Path::new(&root)).expect("open store as unprivileged user");
        let rec = s
            .import_archive("rich", rich_spec().docker_save().as_slice())
            .expect("import as unprivileged user");
        check_rich(&rec.rootfs);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    if effective_uid() != 0 {
        // Already unprivileged (e.g. the CI's unprivileged run): import in-process.
        let s = ImageStore::open(&dir.path().join("images")).expect("open");
        let rec = s
            .import_archive("rich", rich_spec().docker_save().as_slice())
            .expect("import");
        check_rich(&rec.rootfs);
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "--exact",
            "unprivileged_import",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ENV, dir.path().join("images"))
        .output()
        .expect("run setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "unprivileged child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn concurrent_imports_and_gc_share_the_store() {
    let (_d, s) = store();
    let archive = rich_spec().docker_save();
    std::thread::scope(|sc| {
        let a = sc.spawn(|| s.import_archive("a", archive.as_slice()));
        let b = sc.spawn(|| s.import_archive("b", archive.as_slice()));
        let g = sc.spawn(|| (0..5).map(|_| s.gc()).collect::<Result<Vec<_>, _>>());
        a.join().expect("thread a").expect("import a");
        b.join().expect("thread b").expect("import b");
        g.join().expect("thread gc").expect("gc");
    });
    let a = s.get("a").expect("get").expect("a present");
    let b = s.get("b").expect("get").expect("b present");
    assert_eq!(a.rootfs, b.rootfs);
    check_rich(&a.rootfs);
}

/// A store whose caps are tiny, so bombs are cheap to build.
fn capped_store(limits: ImageLimits) -> (tempfile::TempDir, ImageStore) {
    let (d, s) = store();
    (d, s.with_limits(limits))
}

/// 8 MiB of zeros: a ~8 KiB gzip layer.
fn bomb_layer() -> Vec<Entry> {
    vec![Entry::file("bomb", vec![0u8; 8 << 20])]
}

#[test]
fn gzip_bomb_layer_stops_at_the_layer_cap_and_stores_nothing() {
    let (_d, s) = capped_store(ImageLimits {
        max_layer_bytes: 1 << 20,
        ..ImageLimits::default()
    });
    let mut spec = ImageSpec::new(vec![vec![Entry::file("ok", "small")], bomb_layer()]);
    spec.gzip = true;
    let archive = spec.docker_save();
    assert!(archive.len() < 64 << 10, "the bomb is small compressed");
    let err = s
        .import_archive("bomb", archive.as_slice())
        .expect_err("bomb must be refused");
    assert!(err.is_limit(), "{err:?}");
    assert!(
        matches!(
            err,
            ImportError::Layer {
                index: 1,
                source: LayerError::LayerTooLarge { limit: 1048576, .. }
            }
        ),
        "{err:?}"
    );
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err).expect("source")
    );
    assert!(msg.contains("MATCHLOCK_MAX_LAYER_BYTES"), "{msg}");
    assert!(msg.contains("1048576"), "{msg}");
    assert_nothing_stored(&s, "bomb");
    assert_eq!(
        files_in(&s.root().join("layers/sha256")),
        0,
        "the small layer stored before the bomb is pruned"
    );
}

#[test]
fn image_cap_counts_all_layers() {
    // Each layer passes the per-layer cap; together they exceed the per-image cap.
    let layer = |name: &str| vec![Entry::file(name, vec![7u8; 600 << 10])];
    let (_d, s) = capped_store(ImageLimits {
        max_layer_bytes: 1 << 20,
        max_image_bytes: 1 << 20,
        ..ImageLimits::default()
    });
    let mut spec = ImageSpec::new(vec![layer("a"), layer("b")]);
    spec.zstd = true;
    let err = s
        .import_archive("big", spec.docker_save().as_slice())
        .expect_err("over the image cap");
    assert!(
        matches!(
            &err,
            ImportError::Layer {
                index: 1,
                source: LayerError::ImageTooLarge { .. }
            }
        ),
        "{err:?}"
    );
    let msg = std::error::Error::source(&err).expect("source").to_string();
    assert!(msg.contains("MATCHLOCK_MAX_IMAGE_BYTES"), "{msg}");
    assert_nothing_stored(&s, "big");
    assert_eq!(files_in(&s.root().join("layers/sha256")), 0);
    // The same image imports under the default caps.
    let (_d2, s2) = store();
    s2.import_archive("big", spec.docker_save().as_slice())
        .expect("fits the defaults");
}

#[test]
fn too_many_entries_refused_with_the_limit_named() {
    let entries: Vec<Entry> = (0..50)
        .map(|i| Entry::file(&format!("f{i}"), "x"))
        .collect();
    let spec = ImageSpec::new(vec![entries.clone(), vec![Entry::file("g", "y")]]);
    let (_d, s) = capped_store(ImageLimits {
        max_entries: 50,
        ..ImageLimits::default()
    });
    let err = s
        .import_archive("many", spec.docker_save().as_slice())
        .expect_err("51 entries over a cap of 50");
    assert!(
        matches!(
            &err,
            ImportError::Flatten(FlattenError::TooManyEntries {
                layer: 1,
                limit: 50
            })
        ),
        "{err:?}"
    );
    let msg = std::error::Error::source(&err).expect("source").to_string();
    assert!(msg.contains("MATCHLOCK_MAX_IMAGE_ENTRIES"), "{msg}");
    assert_nothing_stored(&s, "many");
    assert_eq!(files_in(&s.root().join("layers/sha256")), 0);
    // Exactly at the cap is fine.
    let (_d2, s2) = capped_store(ImageLimits {
        max_entries: 50,
        ..ImageLimits::default()
    });
    s2.import_archive(
        "fifty",
        ImageSpec::new(vec![entries]).docker_save().as_slice(),
    )
    .expect("50 entries fit");
}
