//! `matchlock rpc`: the JSON-RPC server the SDKs drive, on stdin/stdout.

use anyhow::Context;
use clap::Args;
use matchlock_sandbox::signals::{Hangup, ShutdownSignals};

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
    let (accel, warning) = common::resolve_accel(accel);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let paths = common::paths()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async move {
        let signals = ShutdownSignals::install(Hangup::Default)?;
        let stop = signals.token();
        let opts = matchlock_rpc::ServerOptions {
            paths,
            accel,
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
