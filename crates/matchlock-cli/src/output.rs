//! Output helpers: space-padded tables (like Go's tabwriter with padding 2) and a writer that
//! copies command output into the VM log.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use matchlock_vm::console::ConsoleWriter;
use tokio::io::AsyncWrite;

/// Renders rows as left-aligned columns separated by at least two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(c.len()) + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Writes to `inner` and appends the same bytes to the sandbox's console log (capped and
/// rotated with it; best effort: a log write never fails the command's output).
pub struct Tee<W> {
    inner: W,
    log: Option<ConsoleWriter>,
}

impl<W> Tee<W> {
    pub fn new(inner: W, log: Option<ConsoleWriter>) -> Self {
        Tee { inner, log }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tee<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if let Some(log) = this.log.as_mut() {
                    if log.write_all(&buf[..n]).is_err() {
                        this.log = None;
                    }
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `12.3 MB` style sizes (decimal megabytes, one decimal), as the reference prints them.
pub fn megabytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1_000_000.0;
    format!("{mb:.1} MB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let t = table(
            &["ID", "STATUS"],
            &[vec!["vm-12345678".into(), "running".into()]],
        );
        assert_eq!(t, "ID           STATUS\nvm-12345678  running\n");
    }

    #[test]
    fn megabytes_format() {
        assert_eq!(megabytes(1_234_567), "1.2 MB");
        assert_eq!(megabytes(0), "0.0 MB");
    }
}
