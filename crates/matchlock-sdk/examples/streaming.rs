//! Streaming output, piping stdin, a PTY session with a resize, a port forward, the log, and
//! cancelling a long command with a timeout.
//!
//! `MATCHLOCK_BIN=target/debug/matchlock MATCHLOCK_IMAGE=busybox:local cargo run -p matchlock-sdk --example streaming`

use std::time::Duration;

use matchlock_sdk::{Client, Config, InteractiveOptions, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    client
        .launch(Sandbox::new(&image).with_entrypoint(&[
            "sh",
            "-c",
            "echo entrypoint-started; sleep 3600",
        ]))
        .await?;
    // Output arrives as it is produced.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = client
        .exec_stream(
            "for i in 1 2 3; do echo line $i; done; echo warn >&2",
            &mut out,
            &mut err,
        )
        .await?;
    check(
        r.exit_code == 0 && out == b"line 1\nline 2\nline 3\n" && err == b"warn\n",
        "exec_stream",
    )?;
    // Local data piped into the command's stdin.
    let mut input: &[u8] = b"piped through the sandbox\n";
    let mut out = Vec::new();
    client
        .exec_pipe("tr a-z A-Z", &mut input, &mut out, &mut tokio::io::sink())
        .await?;
    check(out == b"PIPED THROUGH THE SANDBOX\n", "exec_pipe")?;
    // A terminal session: initial size, one resize, then a keystroke to finish.
    let (resize_tx, resize_rx) = tokio::sync::mpsc::channel(4);
    let (mut keys_w, mut keys_r) = tokio::io::duplex(64);
    let typist = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = resize_tx.send((40, 132)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = keys_w.write_all(b"go\r").await;
        keys_w
    });
    let mut screen = Vec::new();
    let r = client
        .exec_interactive(
            "stty size; read x; stty size",
            &mut keys_r,
            &mut screen,
            InteractiveOptions {
                rows: 30,
                cols: 100,
                resize: Some(resize_rx),
                ..Default::default()
            },
        )
        .await?;
    drop(typist.await?);
    let screen = String::from_utf8_lossy(&screen);
    check(
        r.exit_code == 0 && screen.contains("30 100") && screen.contains("40 132"),
        "exec_interactive",
    )?;
    // A guest service reached from the host through a port forward (no guest network).
    let (mut sink_out, mut sink_err) = (tokio::io::sink(), tokio::io::sink());
    let server = client.exec_stream("nc -l -p 7000 -e rev", &mut sink_out, &mut sink_err);
    let forward = async {
        // Wait until the service listens, then forward any free local port to it.
        while client
            .exec("netstat -ltn | grep -q ':7000 '")
            .await?
            .exit_code
            != 0
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let free = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let b = client.port_forward(&[&format!("{free}:7000")]).await?;
        println!(
            "forwarding {}:{} -> sandbox:7000",
            b[0].address, b[0].local_port
        );
        let mut s =
            tokio::net::TcpStream::connect((b[0].address.as_str(), b[0].local_port)).await?;
        s.write_all(b"stressed\n").await?;
        s.shutdown().await?; // half-close: rev answers after EOF
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        Ok::<String, BoxError>(reply)
    };
    let (served, reply) = tokio::join!(server, forward);
    served?;
    check(reply? == "desserts\n", "port forward")?;

    // The launched entrypoint's output is in the log.
    check(client.log().await?.contains("entrypoint-started"), "log")?;
    // Dropping a call (here: a timeout) cancels it; the guest kills the command.
    let slow = tokio::time::timeout(Duration::from_secs(1), client.exec("sleep 600")).await;
    check(slow.is_err(), "timeout")?;
    let mut gone = false;
    for _ in 0..50 {
        let r = client
            .exec("ps | grep -q '[s]leep 600' && echo running || echo gone")
            .await?;
        if r.stdout_str().trim() == "gone" {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(gone, "cancelled command still running")?;

    client.close(Duration::from_secs(2)).await?;
    client.remove().await?;
    Ok(())
}
