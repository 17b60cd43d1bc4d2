//! Launch a sandbox, run commands, move files, then close and remove it.
//!
//! `MATCHLOCK_BIN=target/debug/matchlock MATCHLOCK_IMAGE=busybox:local cargo run -p matchlock-sdk --example basic`

use std::time::Duration;

use matchlock_sdk::{Client, Config, ExecOptions, Sandbox};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await
}

fn check(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("unexpected result: {what}").into())
    }
}

pub async fn run() -> Result<(), BoxError> {
    let image = std::env::var("MATCHLOCK_IMAGE").unwrap_or_else(|_| "alpine:latest".into());
    let client = Client::start(Config::default()).await?;
    let id = client
        .launch(Sandbox::new(&image).with_env("GREETING", "hello from the sdk"))
        .await?;
    println!("sandbox {id}");

    let r = client.exec("echo $GREETING; uname -s").await?;
    print!("{}", r.stdout_str());
    check(
        r.exit_code == 0 && r.stdout_str().starts_with("hello from the sdk"),
        "exec",
    )?;

    let r = client
        .exec_with(
            "pwd",
            &ExecOptions {
                working_dir: "/tmp".into(),
                ..Default::default()
            },
        )
        .await?;
    check(r.stdout_str() == "/tmp\n", "working dir")?;
    let r = client.exec("exit 3").await?;
    check(r.exit_code == 3, "exit code")?;

    client
        .write_file_mode("/opt/demo/hello.sh", b"#!/bin/sh\necho script ran\n", 0o755)
        .await?;
    check(
        client.exec("/opt/demo/hello.sh").await?.stdout_str() == "script ran\n",
        "script",
    )?;
    check(
        client
            .read_file("/opt/demo/hello.sh")
            .await?
            .starts_with(b"#!/bin/sh"),
        "read_file",
    )?;
    let files = client.list_files("/opt/demo").await?;
    println!("files: {files:?}");
    check(
        files
            .iter()
            .any(|f| f.name == "hello.sh" && f.mode & 0o777 == 0o755),
        "list_files",
    )?;
    match client.read_file("/no/such/file").await {
        Err(e) if e.is_file_error() => println!("expected error: {e}"),
        other => return Err(format!("read of a missing file: {other:?}").into()),
    }

    client.close(Duration::from_secs(2)).await?;
    client.remove().await?;
    println!("closed and removed {id}");
    Ok(())
}
