//! `matchlock`: run untrusted code in disposable micro-VMs.
//!
//! # Design
//! One module per subcommand under `cmd/`. Errors are `anyhow` chains printed once, here, as
//! `a: b: c` on stderr with exit code 1; a command that must exit with another code (the
//! guest's exit status) returns [`ExitWith`], which is honoured without printing anything.
//! Command-line usage errors exit 1 too (not clap's 2); help, version, and a group command
//! (`image`, `volume`, `allow-list`) given without its subcommand print help and exit 0.
//! Completion scripts and man pages are generated from these same definitions.

#![forbid(unsafe_code)]

mod cmd;
mod output;
mod term;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    propagate_version = true,
    arg_required_else_help = true
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
    /// Print a sandbox's state and configuration (JSON).
    Get(cmd::lifecycle::IdArg),
    /// Print a sandbox's state, configuration and lifecycle history (JSON).
    #[command(alias = "stat")]
    Inspect(cmd::lifecycle::IdArg),
    Kill(cmd::lifecycle::KillArgs),
    #[command(alias = "remove")]
    Rm(cmd::lifecycle::RmArgs),
    /// Remove every stopped or crashed sandbox.
    Prune,
    Gc(cmd::lifecycle::GcArgs),
    Log(cmd::lifecycle::LogArgs),
    /// Manage local images (list, remove, import, gc).
    #[command(subcommand, arg_required_else_help = true)]
    Image(cmd::image::ImageCmd),
    Pull(cmd::pull::PullArgs),
    Build(cmd::unavailable::BuildArgs),
    #[command(subcommand, arg_required_else_help = true)]
    Volume(cmd::volume::VolumeCmd),
    #[command(name = "port-forward")]
    PortForward(cmd::port_forward::PortForwardArgs),
    /// Change the egress allow-list of a running sandbox.
    #[command(subcommand, name = "allow-list", arg_required_else_help = true)]
    AllowList(cmd::allow_list::AllowListCmd),
    Rpc(cmd::rpc::RpcArgs),
    Diagnose(cmd::diagnose::DiagnoseArgs),
    Completion(cmd::completion::CompletionArgs),
    #[command(hide = true)]
    Man(cmd::completion::ManArgs),
    /// Print the version, commit and build time.
    Version,
}

fn main() -> ExitCode {
    matchlock_sandbox::phases::note_process_start();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MATCHLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_exit(&e),
    };
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
        Command::Volume(c) => cmd::volume::volume(c),
        Command::PortForward(a) => cmd::port_forward::port_forward(a),
        Command::AllowList(c) => cmd::allow_list::allow_list(c),
        Command::Rpc(a) => cmd::rpc::rpc(a),
        Command::Diagnose(a) => cmd::diagnose::diagnose(a),
        Command::Completion(a) => cmd::completion::completion(a, Cli::command()),
        Command::Man(a) => cmd::completion::man(a, Cli::command()),
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

/// Exit for a command line clap did not turn into a command: help and version requests
/// (including a group command such as `image` given without its subcommand) print to stdout
/// and succeed; usage errors print to stderr and exit 1, as every other error does (the
/// reference's convention, instead of clap's 2).
fn usage_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed stdout (`matchlock --help | head -1`) is not a failure.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // clap sends this help to stderr; the reference prints it to stdout.
            let text = e.render().to_string();
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        _ => {
            let _ = e.print();
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
