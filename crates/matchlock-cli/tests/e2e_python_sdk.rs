//! The published Python SDK (`matchlock==0.2.17` from the Python package index, installed
//! into a cached virtualenv by scripts/python-sdk-venv.sh) drives our `matchlock rpc`
//! unchanged: tests/python/sdk_scenarios.py covers its whole surface.

mod common;

#[test]
fn python_sdk_scenarios() {
    let out = common::env()
        .python_sdk("sdk_scenarios.py")
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
