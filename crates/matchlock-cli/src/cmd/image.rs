//! `matchlock image`: the local image store.

use anyhow::Context;
use clap::Subcommand;

use super::common;
use crate::output::{megabytes, table};

/// Manage images.
#[derive(Subcommand)]
pub enum ImageCmd {
    /// List images.
    #[command(alias = "list")]
    Ls,
    /// Remove an image.
    #[command(alias = "remove")]
    Rm {
        /// Image tag.
        tag: String,
    },
    /// Import a `docker save` or OCI image-layout archive from stdin.
    ///
    /// Example: docker save alpine:3.20 | matchlock image import alpine:3.20
    Import {
        /// Tag to store the image under.
        tag: String,
    },
    /// Delete image files no image refers to.
    Gc,
}

pub fn image(c: ImageCmd) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let store = common::image_store(&paths)?;
    match c {
        ImageCmd::Ls => {
            let rows: Vec<Vec<String>> = store
                .list()?
                .into_iter()
                .map(|r| {
                    let source = if r.source.is_empty() {
                        "local".to_string()
                    } else {
                        r.source.clone()
                    };
                    let created = r.created_at.replace('T', " ").chars().take(19).collect();
                    vec![r.tag, source, megabytes(r.size_bytes), created]
                })
                .collect();
            print!("{}", table(&["TAG", "SOURCE", "SIZE", "CREATED"], &rows));
        }
        ImageCmd::Rm { tag } => {
            store.remove(&tag)?;
            println!("Removed {tag}");
        }
        ImageCmd::Import { tag } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                anyhow::bail!("image import reads an archive from stdin: pipe one in, e.g. `matchlock image import {tag} < image.tar`");
            }
            eprintln!("Importing {tag} from stdin...");
            let rec = store
                .import_archive(&tag, std::io::stdin().lock())
                .context("import image")?;
            println!("Imported: {}", rec.tag);
            println!("Layers: {}", rec.layers.len());
            println!("Size: {}", megabytes(rec.size_bytes));
        }
        ImageCmd::Gc => {
            let n = store.gc()?;
            println!("Removed {n} unreferenced blobs");
        }
    }
    Ok(())
}
