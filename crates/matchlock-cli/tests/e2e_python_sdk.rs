//! The published Python SDK (`matchlock==0.2.17` from the Python package index, installed
//! into a cached virtualenv by scripts/python-sdk-venv.sh) drives our `matchlock rpc`
//! unchanged: tests/python/sdk_scenarios.py covers its whole surface.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn python_sdk_scenarios() {
    let python = common::sdk_python();
    let e = common::env();
    let template = e.cmd();
    let mut c = Command::new(python);
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_scenarios.py");
    let out = c
        .arg(scenarios)
        .env("MATCHLOCK_BIN", env!("CARGO_BIN_EXE_matchlock"))
        .env("MATCHLOCK_TEST_IMAGE", common::IMAGE)
        .output()
        .expect("run the Python scenarios");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "Python SDK scenarios failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.matches("PASS").count() >= 7, "{stdout}");
}
