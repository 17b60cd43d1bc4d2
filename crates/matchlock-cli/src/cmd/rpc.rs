//! `matchlock rpc`: the JSON-RPC server the SDKs drive, on stdin/stdout.

use anyhow::Context;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::common;

/// Serve JSON-RPC 2.0 on stdin/stdout (one JSON object per line) for the SDKs.
///
/// Methods: create, exec, exec_stream, exec_pipe, exec_tty, write_file, read_file,
/// list_files, log, log_stream, port_forward, allow_list_add, allow_list_delete, cancel,
/// close. Logs go to stderr. Closing stdin (or SIGINT/SIGTERM) shuts the sandbox down.
///
/// Example:
///   echo '{"jsonrpc":"2.0","method":"create","params":{"image":"busybox:local"},"id":1}' | matchlock rpc
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RpcArgs {
    /// Virtualization: auto (KVM when usable, else TCG emulation), kvm or tcg.
    #[arg(long, default_value = "auto", env = "MATCHLOCK_ACCEL")]
    pub accel: String,
}

pub fn rpc(a: RpcArgs) -> anyhow::Result<()> {
    let accel: matchlock_vm::Accel = a
        .accel
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --accel {:?} (use auto, kvm or tcg)", a.accel))?;
    let choice = matchlock_vm::detect_accel(accel);
    if choice.accel == matchlock_vm::Accel::Tcg
        && accel == matchlock_vm::Accel::Auto
        && std::env::var_os("MATCHLOCK_QUIET_ACCEL").is_none()
    {
        tracing::warn!("{}", choice.reason);
    }
    let paths = common::paths()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            s.cancel();
        });
        let opts = matchlock_rpc::ServerOptions {
            paths,
            accel: choice.accel,
            owner_pid: std::process::id(),
        };
        matchlock_rpc::serve(
            tokio::io::BufReader::new(tokio::io::stdin()),
            tokio::io::stdout(),
            opts,
            stop,
        )
        .await
        .context("rpc server")
    })?;
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
