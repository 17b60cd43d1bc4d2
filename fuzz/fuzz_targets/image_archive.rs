//! Image import on arbitrary bytes into a temp store: must return Ok or an error, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use matchlock_image::ImageStore;

struct Fixture {
    _dir: tempfile::TempDir,
    store: ImageStore,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(&dir.path().join("images")).expect("open store");
        Fixture { _dir: dir, store }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let _ = f.store.import_archive("fuzz:latest", data);
    // Keep the store from growing without bound across iterations.
    let _ = f.store.remove("fuzz:latest");
    let _ = f.store.gc();
});
