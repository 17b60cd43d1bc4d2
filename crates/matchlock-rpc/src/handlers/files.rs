//! Guest files (`write_file`, `read_file`, `list_files`) and the sandbox log (`log`,
//! `log_stream`).

use std::time::Duration;

use matchlock_api::rpc::{
    b64, envelope, to_value, ContentResult, Empty, FileEntry, FileParams, ListFilesResult, Notice,
    StreamData,
};
use matchlock_sandbox::files;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::shared::Shared;

/// `log_stream` polling interval.
const LOG_POLL: Duration = Duration::from_millis(100);

async fn file_conn(s: &Shared, path: &str) -> Result<tokio::net::UnixStream, Failure> {
    if path.is_empty() {
        return Err(Failure::Missing("path"));
    }
    s.current()?.connect().await.map_err(Failure::FileConnect)
}

async fn cancellable<T>(
    cancel: &CancellationToken,
    f: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::select! {
        r = f => r,
        () = cancel.cancelled() => Err(Failure::Cancelled),
    }
}

pub async fn write_file(
    s: &Shared,
    p: FileParams,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let data = b64::decode(&p.content).map_err(|_| Failure::Base64)?;
    let conn = file_conn(s, &p.path).await?;
    let mode = if p.mode == 0 { 0o644 } else { p.mode };
    cancellable(&cancel, async {
        files::write_file(conn, &p.path, &data, mode)
            .await
            .map_err(Failure::File)
    })
    .await?;
    Ok(to_value(&Empty {}))
}

pub async fn read_file(
    s: &Shared,
    p: FileParams,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let conn = file_conn(s, &p.path).await?;
    let data = cancellable(&cancel, async {
        files::read_file(conn, &p.path).await.map_err(Failure::File)
    })
    .await?;
    Ok(to_value(&ContentResult {
        content: b64::encode(&data),
    }))
}

pub async fn list_files(
    s: &Shared,
    p: FileParams,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let conn = file_conn(s, &p.path).await?;
    let list = cancellable(&cancel, async {
        files::list_files(conn, &p.path)
            .await
            .map_err(Failure::File)
    })
    .await?;
    let files = list
        .iter()
        .map(|f| FileEntry {
            name: f.name.clone(),
            size: f.size,
            mode: matchlock_api::rpc::go_file_mode(f.mode),
            mod_time: "0001-01-01T00:00:00Z".into(),
            is_dir: f.is_dir,
        })
        .collect();
    Ok(to_value(&ListFilesResult { files }))
}

fn log_path(s: &Shared) -> Result<std::path::PathBuf, Failure> {
    if let Ok(cur) = s.current() {
        return Ok(cur.console_log());
    }
    s.last_log().ok_or(Failure::NoVm)
}

/// Most bytes a `log` reply carries: the end of the log (the whole log is at most twice the
/// console cap on disk, but one JSON line should stay small).
pub const LOG_REPLY_MAX: u64 = 4 << 20;
/// Most bytes `log_stream` reads per poll.
const LOG_CHUNK: usize = 64 * 1024;

/// Reads up to `max` bytes of `path` from `offset`; `None` if the file does not exist.
async fn read_from(
    path: &std::path::Path,
    offset: u64,
    max: usize,
) -> std::io::Result<Option<(Vec<u8>, u64)>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    f.seek(std::io::SeekFrom::Start(offset.min(len))).await?;
    let mut buf = Vec::new();
    (&mut f).take(max as u64).read_to_end(&mut buf).await?;
    Ok(Some((buf, len)))
}

pub async fn log(s: &Shared) -> Result<Value, Failure> {
    let path = log_path(s)?;
    let len = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let start = len.saturating_sub(LOG_REPLY_MAX);
    let max = usize::try_from(LOG_REPLY_MAX).unwrap_or(usize::MAX);
    let data = match read_from(&path, start, max).await {
        Ok(d) => d.map(|(d, _)| d).unwrap_or_default(),
        Err(source) => {
            return Err(Failure::Log {
                path: path.display().to_string(),
                source,
            })
        }
    };
    Ok(to_value(&ContentResult {
        content: b64::encode(&data),
    }))
}

/// Streams the log from the start, then follows it by offset (reading only new bytes); a
/// log that shrank was rotated and is followed from its new start.
pub async fn log_stream(
    s: &Shared,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let Some(id) = id.cloned() else {
        return Err(Failure::IdRequired("log_stream"));
    };
    let path = log_path(s)?;
    let mut offset: u64 = 0;
    loop {
        if cancel.is_cancelled() || s.closing.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        if let Ok(Some((data, len))) = read_from(&path, offset, LOG_CHUNK).await {
            if len < offset {
                offset = 0;
                continue;
            }
            if !data.is_empty() {
                offset += data.len() as u64;
                let params = StreamData {
                    id: id.clone(),
                    data: b64::encode(&data),
                };
                // The data path: a client that reads slowly slows this loop, not memory.
                let line = envelope::notification(Notice::LogStreamData, to_value(&params));
                let sent = tokio::select! {
                    ok = s.send_data(line.into()) => ok,
                    () = cancel.cancelled() => false,
                    () = s.closing.cancelled() => false,
                };
                if !sent {
                    return Err(Failure::Cancelled);
                }
                if data.len() == LOG_CHUNK {
                    continue;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled),
            () = s.closing.cancelled() => return Err(Failure::Cancelled),
            () = tokio::time::sleep(LOG_POLL) => {}
        }
    }
}
