//! The Rust SDK's runnable examples (crates/matchlock-sdk/examples), run as tests against the
//! built binary: the code users copy is the code that is tested.
//!
//! The examples read `MATCHLOCK_BIN`/`MATCHLOCK_IMAGE` and the SDK spawns the binary with its
//! own process environment, which must also carry the test HOME, kernel and guest runtime.
//! Setting those with `std::env::set_var` in a test races with every other thread of the test
//! binary that reads the environment, so each test instead re-runs itself in a child process
//! of this test binary with the environment passed to that child's command; the child runs
//! the example (its environment is already right) and the parent checks that it passed.

mod common;

#[allow(dead_code)]
#[path = "../../matchlock-sdk/examples/basic.rs"]
mod basic;
#[allow(dead_code)]
#[path = "../../matchlock-sdk/examples/streaming.rs"]
mod streaming;

/// Set (to the test's name) in the child process that runs an example.
const CHILD: &str = "MATCHLOCK_SDK_EXAMPLE_CHILD";

/// True in the child started by [`run_in_child`] for test `name`.
fn is_child(name: &str) -> bool {
    std::env::var_os(CHILD).is_some_and(|v| v == name)
}

/// Runs test `name` of this binary in a child process whose environment points the SDK at the
/// test environment, and fails unless that child ran it and it passed.
fn run_in_child(name: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = common::env().client_cmd(exe);
    child
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("MATCHLOCK_IMAGE", common::IMAGE)
        .env(CHILD, name);
    let out = child.output().expect("run the example in a child process");
    let stdout = common::stdout(&out);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} in a child process: {}\n{stdout}\n{}",
        out.status,
        common::stderr(&out)
    );
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

#[test]
fn example_basic() {
    if is_child("example_basic") {
        block_on(basic::run()).expect("examples/basic.rs");
    } else {
        run_in_child("example_basic");
    }
}

#[test]
fn example_streaming() {
    if is_child("example_streaming") {
        block_on(streaming::run()).expect("examples/streaming.rs");
    } else {
        run_in_child("example_streaming");
    }
}
