//! Pull tests against a real `docker-registry` on 127.0.0.1 (started per test with temp
//! storage), with images pushed by test code and, where a failure must be injected, a
//! fault proxy in front of it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use matchlock_image::{
    FlattenError, ImageLimits, ImageStore, ImportError, LayerError, ManifestError, PullError,
    PullOptions, RegistryError, RetryPolicy, Scope,
};
use matchlock_test_support::{ConfigSpec, Entry, FaultProxy, Faults, ImageSpec, Registry};

fn opts(dir: &Path) -> PullOptions {
    PullOptions {
        docker_config: Some(dir.join("no-docker-config.json")),
        retry: RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(20),
        },
        read_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn two_layer_spec() -> ImageSpec {
    let mut s = ImageSpec::new(vec![
        vec![
            Entry::dir("bin"),
            Entry::file("bin/tool", b"#!/bin/sh\necho tool\n".to_vec()).mode(0o755),
            Entry::symlink("bin/sh", "/bin/busybox"),
        ],
        vec![
            Entry::dir("etc"),
            Entry::file("etc/motd", b"hello from the registry\n".to_vec()),
        ],
    ]);
    s.gzip = true;
    s.config = ConfigSpec {
        env: vec!["PATH=/bin".into(), "A=b=c".into()],
        cmd: vec!["/bin/tool".into()],
        working_dir: "/etc".into(),
        user: "0".into(),
        ..Default::default()
    };
    s
}

/// Allocated bytes of every file under the layer and rootfs stores.
fn blob_usage(root: &Path) -> u64 {
    ["layers/sha256", "rootfs"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("read_dir"))
        .map(|e| e.expect("entry").metadata().expect("meta").blocks() * 512)
        .sum()
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: ImageStore,
    opts: PullOptions,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("images");
    let store = ImageStore::open(&root).expect("open store");
    let opts = opts(dir.path());
    Fixture {
        _dir: dir,
        root,
        store,
        opts,
    }
}

#[test]
fn anonymous_pull_cache_resolution_alias_and_force() {
    let reg = Registry::start().expect("registry");
    let pushed = reg
        .push("team/tool", "1.2", &two_layer_spec())
        .expect("push");
    let f = fixture();
    let reference = format!("{}/team/tool:1.2", reg.addr);
    let rec = f.store.pull(&reference, &f.opts).expect("pull");
    assert_eq!(rec.scope, Scope::Registry);
    assert_eq!(rec.source, "registry");
    assert_eq!(rec.digest, pushed);
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(rec.config.cmd, vec!["/bin/tool".to_owned()]);
    assert_eq!(rec.config.working_dir, "/etc");
    assert_eq!(rec.config.env.get("A").map(String::as_str), Some("b=c"));
    assert!(rec.rootfs.is_file());

    // Resolution: cache hit without contacting the registry.
    let hit = f.store.resolve(&reference, &f.opts).expect("resolve");
    assert!(hit.cached);
    assert_eq!(hit.record.digest, pushed);

    // A tag alias adds a local row but no bytes.
    let before = blob_usage(&f.root);
    let alias = f.store.tag(&rec, "tool:alias").expect("tag");
    assert_eq!((alias.scope, alias.source.as_str()), (Scope::Local, "tag"));
    assert_eq!(blob_usage(&f.root), before);
    assert_eq!(
        f.store.get("tool:alias").expect("get").map(|r| r.rootfs),
        Some(rec.rootfs.clone())
    );

    // Repeated forced pulls keep usage stable.
    let force = PullOptions {
        force: true,
        ..f.opts.clone()
    };
    for _ in 0..2 {
        let r = f.store.resolve(&reference, &force).expect("force pull");
        assert!(!r.cached);
        assert_eq!(blob_usage(&f.root), before);
    }

    // A cache entry whose files are missing is a miss: resolve pulls again.
    for l in std::fs::read_dir(f.root.join("layers/sha256")).expect("ls") {
        std::fs::remove_file(l.expect("entry").path()).expect("rm layer");
    }
    let again = f.store.resolve(&reference, &f.opts).expect("re-pull");
    assert!(!again.cached);
    assert_eq!(blob_usage(&f.root), before);

    // rm: the local alias first, then the registry row, then not found.
    f.store.remove("tool:alias").expect("rm alias");
    f.store.remove(&reference).expect("rm pulled");
    assert!(f.store.remove(&reference).is_err());
    assert_eq!(blob_usage(&f.root), 0, "rm pruned every file");
}

#[test]
fn pull_by_digest_docker_types_zstd_and_multi_arch_index() {
    let reg = Registry::start().expect("registry");
    let mut spec = two_layer_spec();
    spec.docker_media_types = true;
    spec.zstd = true;
    spec.extra_arm64 = true;
    let index_digest = reg.push("multi", "v1", &spec).expect("push");
    let f = fixture();
    let reference = format!("{}/multi@{index_digest}", reg.addr);
    let rec = f.store.pull(&reference, &f.opts).expect("pull by digest");
    // The recorded digest is the platform manifest's, not the index's.
    assert_ne!(rec.digest, index_digest);
    let want_cmd = if matchlock_image::host_arch() == "arm64" {
        vec!["arm64".to_owned()]
    } else {
        vec!["/bin/tool".to_owned()]
    };
    assert_eq!(rec.config.cmd, want_cmd, "host platform picked");
    let arm = PullOptions {
        arch: "arm64".into(),
        ..f.opts.clone()
    };
    let tag_ref = format!("{}/multi:v1", reg.addr);
    let arm_rec = f.store.pull(&tag_ref, &arm).expect("arm64 pull");
    assert_eq!(arm_rec.config.cmd, vec!["arm64".to_owned()]);
    let s390 = PullOptions {
        arch: "s390x".into(),
        ..f.opts.clone()
    };
    let e = f.store.pull(&tag_ref, &s390).expect_err("no s390x image");
    assert!(
        matches!(
            &e,
            PullError::Manifest {
                source: ManifestError::NoPlatform { .. },
                ..
            }
        ),
        "{e:?}"
    );
    // Wrong digest for an existing repository: 404 with the registry's message.
    let missing = format!("{}/multi@sha256:{}", reg.addr, "0".repeat(64));
    let e = f.store.pull(&missing, &f.opts).expect_err("unknown digest");
    let msg = format!("{:#}", anyhow_chain(&e));
    assert!(msg.contains("manifest unknown"), "{msg}");
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn htpasswd_registry_with_docker_config_credentials() {
    let reg = Registry::start_with_auth("alice", "s3cret").expect("registry");
    reg.push("private/app", "latest", &two_layer_spec())
        .expect("push");
    let f = fixture();
    let reference = format!("{}/private/app", reg.addr);
    // Anonymous: 401 with the registry's message.
    let e = f.store.pull(&reference, &f.opts).expect_err("anonymous");
    assert!(
        matches!(
            &e,
            PullError::FetchManifest {
                source: RegistryError::Unauthorized { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.json");
    let write = |user: &str, pass: &str| {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(
            &cfg,
            format!(
                r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
                reg.addr
            ),
        )
        .expect("write docker config");
    };
    let with_cfg = PullOptions {
        docker_config: Some(cfg.clone()),
        ..f.opts.clone()
    };
    write("alice", "wrong");
    let e = f
        .store
        .pull(&reference, &with_cfg)
        .expect_err("wrong password");
    let msg = anyhow_chain(&e);
    assert!(
        msg.contains("authentication required") && msg.contains(&reg.addr),
        "{msg}"
    );
    assert_eq!(file_count(&f.root.join("layers/sha256")), 0);
    write("alice", "s3cret");
    let rec = f.store.pull(&reference, &with_cfg).expect("authed pull");
    assert_eq!(rec.layers.len(), 2);
}

#[test]
fn corrupt_blob_rejected_and_nothing_stored() {
    let reg = Registry::start().expect("registry");
    let spec = two_layer_spec();
    let parts = spec.registry_parts();
    reg.push("c", "v", &spec).expect("push");
    let proxy = FaultProxy::start(&reg.addr).expect("proxy");
    let layer1 = parts.blobs[1].0.clone();
    proxy.set(Faults {
        corrupt_path: Some(layer1.clone()),
        ..Default::default()
    });
    let f = fixture();
    let reference = format!("{}/c:v", proxy.addr);
    let e = f.store.pull(&reference, &f.opts).expect_err("corrupt blob");
    assert!(
        matches!(
            &e,
            PullError::Layer {
                source: LayerError::BlobDigest { .. },
                ..
            }
        ),
        "{e:?}"
    );
    // Layer 0 may have been stored (verified); the corrupt one is not, and no image row.
    assert!(file_count(&f.root.join("layers/sha256")) <= 1);
    assert_eq!(file_count(&f.root.join("rootfs")), 0);
    assert_eq!(file_count(&f.root.join("tmp")), 0, "no temp left");
    assert!(f.store.list().expect("list").is_empty());
    assert!(f.store.gc().expect("gc") <= 1);
    assert_eq!(file_count(&f.root.join("layers/sha256")), 0);
}

#[test]
fn transient_errors_retry_and_registry_down_mid_pull_resumes() {
    let reg = Registry::start().expect("registry");
    let mut spec = two_layer_spec();
    // A bigger second layer so a truncated transfer is really mid-blob.
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let big: Vec<u8> = (0..400_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    spec.layers[1].push(Entry::file("etc/big", big));
    let parts = spec.registry_parts();
    reg.push("d", "v", &spec).expect("push");
    let proxy = FaultProxy::start(&reg.addr).expect("proxy");
    let f = fixture();
    let reference = format!("{}/d:v", proxy.addr);

    // Two 429s then success: retried.
    proxy.set(Faults {
        fail_status: 429,
        fail_count: 2,
        fail_path: "/manifests/".into(),
        ..Default::default()
    });
    f.store.pull(&reference, &f.opts).expect("pull after 429s");
    f.store.remove(&reference).expect("rm");

    // 503 forever: gives up with the status and message.
    proxy.set(Faults {
        fail_status: 503,
        fail_count: usize::MAX,
        fail_path: "/manifests/".into(),
        ..Default::default()
    });
    let e = f.store.pull(&reference, &f.opts).expect_err("503");
    let msg = anyhow_chain(&e);
    assert!(
        msg.contains("503") && msg.contains("after 3 attempts"),
        "{msg}"
    );

    // The registry goes away in the middle of the big layer, every time.
    let big_blob = parts.blobs[1].0.clone();
    proxy.set(Faults {
        truncate_path: Some(big_blob.clone()),
        truncate_after: 100_000,
        truncate_count: usize::MAX,
        ..Default::default()
    });
    let e = f
        .store
        .pull(&reference, &f.opts)
        .expect_err("down mid-pull");
    assert!(matches!(&e, PullError::LayerStream { .. }), "{e:?}");
    assert!(f.store.list().expect("list").is_empty());
    assert_eq!(file_count(&f.root.join("tmp")), 0, "no partial temp files");
    let small_fetches = proxy.count(&parts.blobs[0].0);
    // Fully down, then back up: the pull resumes, fetching only the missing layer.
    proxy.set(Faults {
        down: true,
        ..Default::default()
    });
    assert!(f.store.pull(&reference, &f.opts).is_err());
    proxy.set(Faults::default());
    let rec = f
        .store
        .pull(&reference, &f.opts)
        .expect("pull after recovery");
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(
        proxy.count(&parts.blobs[0].0),
        small_fetches,
        "stored layer not downloaded again"
    );
}

#[test]
fn hostile_layers_and_bad_references_fail_cleanly() {
    let reg = Registry::start().expect("registry");
    let f = fixture();
    for (repo, entries) in [
        ("trav", vec![Entry::file("../../etc/evil", b"x".to_vec())]),
        (
            "hl",
            vec![
                Entry::file("a", b"x".to_vec()),
                Entry::hardlink("b", "../../etc/passwd"),
            ],
        ),
        (
            "below",
            vec![
                Entry::symlink("etc", "/etc"),
                Entry::file("etc/passwd", b"x".to_vec()),
            ],
        ),
    ] {
        reg.push(repo, "v", &ImageSpec::new(vec![entries]))
            .expect("push");
        let reference = format!("{}/{repo}:v", reg.addr);
        let e = f.store.pull(&reference, &f.opts).expect_err(repo);
        assert!(matches!(&e, PullError::Rootfs(_)), "{repo}: {e:?}");
        assert!(f.store.get(&reference).expect("get").is_none());
    }
    for bad in ["UPPER/case", "x@sha256:12", "a b", ""] {
        assert!(
            matches!(f.store.pull(bad, &f.opts), Err(PullError::Reference(_))),
            "{bad:?}"
        );
    }
    let e = f
        .store
        .pull(&format!("{}/nope:v", reg.addr), &f.opts)
        .expect_err("unknown repo");
    assert!(
        matches!(
            &e,
            PullError::FetchManifest {
                source: RegistryError::NotFound { .. },
                ..
            }
        ),
        "{e:?}"
    );
    // Plain HTTP is refused for non-loopback registries unless marked insecure: the client
    // talks HTTPS to them (here: nothing listens, so a transport error, not a silent HTTP).
    let e = f
        .store
        .pull("registry.invalid/x:v", &f.opts)
        .expect_err("no such registry");
    assert!(anyhow_chain(&e).contains("https://registry.invalid"), "{e}");
}

#[test]
fn disk_full_mid_pull_leaves_nothing() {
    if nix_is_root() {
        let reg = Registry::start().expect("registry");
        // ~6 MB of incompressible data: larger than the 4 MiB store filesystem.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let big: Vec<u8> = (0..6_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut spec = ImageSpec::new(vec![vec![Entry::file("big", big)]]);
        spec.gzip = true;
        reg.push("full", "v", &spec).expect("push");
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _guard = Unmount(&mnt);
        let store = ImageStore::open(&mnt).expect("store");
        let e = store
            .pull(&format!("{}/full:v", reg.addr), &opts(dir.path()))
            .expect_err("disk full");
        assert!(matches!(&e, PullError::Layer { .. }), "{e:?}");
        assert!(
            anyhow_chain(&e).to_lowercase().contains("no space"),
            "{}",
            anyhow_chain(&e)
        );
        assert_eq!(file_count(&mnt.join("layers/sha256")), 0);
        assert_eq!(file_count(&mnt.join("tmp")), 0);
        assert!(store.list().expect("list").is_empty());
    } else {
        eprintln!("disk_full_mid_pull_leaves_nothing: needs root to mount a small tmpfs; not run");
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn progress_reports_bytes_per_layer() {
    use std::sync::atomic::{AtomicU64, Ordering};
    struct Count(AtomicU64, AtomicU64);
    impl matchlock_image::PullProgress for Count {
        fn layer_bytes(&self, _i: usize, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn layer_done(&self, _i: usize, _cached: bool) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }
    let reg = Registry::start().expect("registry");
    let spec = two_layer_spec();
    let parts = spec.registry_parts();
    reg.push("p", "v", &spec).expect("push");
    let f = fixture();
    let counter = Arc::new(Count(AtomicU64::new(0), AtomicU64::new(0)));
    let o = PullOptions {
        progress: counter.clone(),
        ..f.opts.clone()
    };
    f.store
        .pull(&format!("{}/p:v", reg.addr), &o)
        .expect("pull");
    let layer_bytes: u64 = parts.blobs[..2].iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(counter.0.load(Ordering::Relaxed), layer_bytes);
    assert_eq!(counter.1.load(Ordering::Relaxed), 2);
}

#[test]
fn gzip_bomb_and_entry_flood_refused_on_pull_and_nothing_stored() {
    let reg = Registry::start().expect("registry");
    let mut bomb = ImageSpec::new(vec![
        vec![Entry::file("ok", "small")],
        vec![Entry::file("bomb", vec![0u8; 8 << 20])],
    ]);
    bomb.gzip = true;
    reg.push("bomb", "v", &bomb).expect("push bomb");
    let flood = ImageSpec::new(vec![(0..64)
        .map(|i| Entry::file(&format!("f{i}"), "x"))
        .collect()]);
    reg.push("flood", "v", &flood).expect("push flood");
    // Two layers under the per-layer cap whose sum is over the per-image cap; downloaded in
    // parallel, they share one budget.
    let mut big = ImageSpec::new(vec![
        vec![Entry::file("a", vec![1u8; 600 << 10])],
        vec![Entry::file("b", vec![2u8; 600 << 10])],
    ]);
    big.zstd = true;
    reg.push("big", "v", &big).expect("push big");

    let f = fixture();
    let store = f.store.with_limits(ImageLimits {
        max_layer_bytes: 1 << 20,
        max_image_bytes: (1 << 20) + (64 << 10),
        max_entries: 32,
    });
    let e = store
        .pull(&format!("{}/bomb:v", reg.addr), &f.opts)
        .expect_err("bomb");
    assert!(e.is_limit(), "{e:?}");
    assert!(
        matches!(
            &e,
            PullError::Layer {
                source: LayerError::LayerTooLarge { limit: 1048576, .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        anyhow_chain(&e).contains("MATCHLOCK_MAX_LAYER_BYTES"),
        "{}",
        anyhow_chain(&e)
    );
    let e = store
        .pull(&format!("{}/flood:v", reg.addr), &f.opts)
        .expect_err("flood");
    assert!(
        matches!(
            &e,
            PullError::Rootfs(ImportError::Flatten(FlattenError::TooManyEntries {
                limit: 32,
                ..
            }))
        ),
        "{e:?}"
    );
    assert!(anyhow_chain(&e).contains("MATCHLOCK_MAX_IMAGE_ENTRIES"));
    let e = store
        .pull(&format!("{}/big:v", reg.addr), &f.opts)
        .expect_err("over the image cap");
    assert!(
        matches!(
            &e,
            PullError::Layer {
                source: LayerError::ImageTooLarge { limit: 1114112, .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(anyhow_chain(&e).contains("MATCHLOCK_MAX_IMAGE_BYTES"));
    assert!(store.list().expect("list").is_empty());
    for d in ["layers/sha256", "rootfs", "tmp"] {
        assert_eq!(file_count(&f.root.join(d)), 0, "{d} not empty");
    }
}
