//! The Rust SDK's runnable examples (crates/matchlock-sdk/examples), run as tests against the
//! built binary: the code users copy is the code that is tested.

mod common;

#[allow(dead_code)]
#[path = "../../matchlock-sdk/examples/basic.rs"]
mod basic;
#[allow(dead_code)]
#[path = "../../matchlock-sdk/examples/streaming.rs"]
mod streaming;

/// The examples read `MATCHLOCK_BIN`/`MATCHLOCK_IMAGE` and the SDK spawns the binary with
/// this process's environment, so point both at the test environment. Each example runs in
/// its own test binary process state, so setting the variables here is race-free: both tests
/// set the same values.
fn setup() {
    let e = common::env();
    let template = e.cmd();
    for (k, v) in template.get_envs() {
        if let Some(v) = v {
            std::env::set_var(k, v);
        }
    }
    std::env::set_var("MATCHLOCK_BIN", env!("CARGO_BIN_EXE_matchlock"));
    std::env::set_var("MATCHLOCK_IMAGE", common::IMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_basic() {
    setup();
    basic::run().await.expect("examples/basic.rs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_streaming() {
    setup();
    streaming::run().await.expect("examples/streaming.rs");
}
