//! `matchlock completion <shell>` and `matchlock man`: shell completion scripts and manual
//! pages, generated from the same clap definitions that parse the command line.
//!
//! # Design
//! Both are rendered from `Cli::command()` at run time, so they cannot drift from the parser.
//! Output is rendered into memory first and then written with error handling: the generators
//! panic on write errors, and `matchlock completion bash | head` must not panic.
//!
//! # Limitations
//! The man pages are what clap_mangen derives from `--help` (name, synopsis, description,
//! options, subcommands); they carry no hand-written prose beyond the long help texts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

/// Print a shell completion script.
///
/// Examples:
///   matchlock completion bash > ~/.local/share/bash-completion/completions/matchlock
///   matchlock completion zsh > "${fpath[1]}/_matchlock"
///   matchlock completion fish > ~/.config/fish/completions/matchlock.fish
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct CompletionArgs {
    /// Shell to generate the script for.
    pub shell: Shell,
}

/// Print the manual page (roff), or write one page per command into a directory.
///
/// Examples:
///   matchlock man | man -l -
///   matchlock man --dir ~/.local/share/man/man1   # then: man matchlock, man matchlock-run
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ManArgs {
    /// Write matchlock.1 and matchlock-<command>.1 for every command into this directory
    /// (created if missing) instead of printing matchlock.1 to stdout.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn completion(a: CompletionArgs, mut cli: clap::Command) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cli, "matchlock", &mut script);
    write_stdout(&script)
}

pub fn man(a: ManArgs, cli: clap::Command) -> anyhow::Result<()> {
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cli, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cli)
                .render(&mut page)
                .context("rendering the man page")?;
            write_stdout(&page)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
