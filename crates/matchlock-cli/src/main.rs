//! `matchlock`: run untrusted code in disposable micro-VMs.
//!
//! # Design
//! One module per subcommand under `cmd/`. Errors are `anyhow` chains printed once, here, as
//! `a: b: c` on stderr with exit code 1; a command that must exit with another code (the
//! guest's exit status) returns [`ExitWith`], which is honoured without printing anything.

#![forbid(unsafe_code)]

mod cmd;
mod output;
mod term;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit with this code without printing (the guest command's status, or an already reported
/// failure).
#[derive(Debug)]
pub struct ExitWith(pub i32);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser)]
#[command(
    name = "matchlock",
    version = VERSION,
    about = "A lightweight micro-VM sandbox for running llm agent securely",
    long_about = "A lightweight micro-VM sandbox for running llm agent securely.\n\n\
Every sandbox is a disposable VM booted from an OCI image. Start with:\n  \
matchlock run --image <image> -- echo hello\n\n\
Images are pulled from registries (`matchlock pull alpine:latest`) or imported with\n\
`matchlock image import` (docker save / OCI archives).\n\
Run `matchlock diagnose` if a sandbox does not start.",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(Box<cmd::run::RunArgs>),
    Exec(cmd::exec::ExecArgs),
    #[command(alias = "ls")]
    List(cmd::lifecycle::ListArgs),
    Get(cmd::lifecycle::IdArg),
    #[command(alias = "stat")]
    Inspect(cmd::lifecycle::IdArg),
    Kill(cmd::lifecycle::KillArgs),
    #[command(alias = "remove")]
    Rm(cmd::lifecycle::RmArgs),
    Prune,
    Gc(cmd::lifecycle::GcArgs),
    Log(cmd::lifecycle::LogArgs),
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    Pull(cmd::pull::PullArgs),
    Build(cmd::unavailable::BuildArgs),
    Volume(cmd::unavailable::VolumeArgs),
    #[command(name = "port-forward")]
    PortForward(cmd::port_forward::PortForwardArgs),
    #[command(subcommand, name = "allow-list")]
    AllowList(cmd::allow_list::AllowListCmd),
    Rpc(cmd::rpc::RpcArgs),
    Diagnose(cmd::diagnose::DiagnoseArgs),
    Version,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MATCHLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(*a),
        Command::Exec(a) => cmd::exec::exec(a),
        Command::List(a) => cmd::lifecycle::list(a),
        Command::Get(a) => cmd::lifecycle::get(a),
        Command::Inspect(a) => cmd::lifecycle::inspect(a),
        Command::Kill(a) => cmd::lifecycle::kill(a),
        Command::Rm(a) => cmd::lifecycle::rm(a),
        Command::Prune => cmd::lifecycle::prune(),
        Command::Gc(a) => cmd::lifecycle::gc(a),
        Command::Log(a) => cmd::lifecycle::log(a),
        Command::Image(c) => cmd::image::image(c),
        Command::Pull(a) => cmd::pull::pull(a),
        Command::Build(a) => cmd::unavailable::build(a),
        Command::Volume(a) => cmd::unavailable::volume(a),
        Command::PortForward(a) => cmd::port_forward::port_forward(a),
        Command::AllowList(c) => cmd::allow_list::allow_list(c),
        Command::Rpc(a) => cmd::rpc::rpc(a),
        Command::Diagnose(a) => cmd::diagnose::diagnose(a),
        Command::Version => {
            println!(
                "matchlock {VERSION} (commit: {}, built: {})",
                option_env!("MATCHLOCK_GIT_COMMIT").unwrap_or("unknown"),
                option_env!("MATCHLOCK_BUILD_TIME").unwrap_or("unknown")
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ExitWith(code)) = e.downcast_ref::<ExitWith>() {
                return ExitCode::from(u8::try_from(*code & 0xff).unwrap_or(1));
            }
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// True when the error chain contains a broken pipe (our stdout was closed early).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
