//! Newline-delimited framing with bounded lines (spec §2.1). The envelope itself (requests,
//! responses, notifications, ids) is the shared contract in `matchlock_api::rpc::envelope`,
//! re-exported here for the server.
//!
//! # Design
//! Lines longer than [`MAX_LINE`] are skipped up to their newline and answered with an
//! error instead of ending the server (the reference exits).

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest accepted request line, newline excluded (the reference's scanner limit).
pub const MAX_LINE: usize = 10 << 20;

pub use matchlock_api::rpc::envelope::{
    error_response, id_key, notification, parse_request, response, BadLine, Request,
};

/// One line from the client.
#[derive(Debug, PartialEq)]
pub enum Line {
    Text(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
}

/// Reads newline-delimited lines with a length bound, without ever buffering more than
/// `max` bytes of one line.
pub struct LineReader<R> {
    inner: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader { inner, max }
    }

    /// The next line (without its newline), or `None` at EOF. A final line without a newline
    /// is returned as a line.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                return Ok(match (too_long, buf.is_empty()) {
                    (true, _) => Some(Line::TooLong),
                    (false, true) => None,
                    (false, false) => Some(Line::Text(buf)),
                });
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if buf.len() + take > self.max {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(if too_long {
                    Line::TooLong
                } else {
                    Line::Text(buf)
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_limit() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nafter\nlast");
        // A tiny buffer makes the long line span many fill_buf calls.
        let r = tokio::io::BufReader::with_capacity(8, input.as_slice());
        let mut lr = LineReader::new(r, 10);
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"short".to_vec()))
        );
        assert_eq!(lr.next().await.expect("r"), Some(Line::TooLong));
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"after".to_vec()))
        );
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"last".to_vec()))
        );
        assert_eq!(lr.next().await.expect("r"), None);
    }
}
