//! The exec relay: a unix socket (`exec.sock` in the VM's state dir, mode 0700 dir) through
//! which other host processes (`matchlock exec`, later `port-forward`) reach a sandbox owned
//! by this process.
//!
//! # Design
//! The relay speaks the guest protocol itself. It reads the client's first frame; an `Exec`
//! request goes through [`Sandbox::open_exec`] (which applies the sandbox's exec defaults),
//! other per-command requests get a fresh guest connection; it forwards the frame and then
//! splices bytes both ways. So a client disconnect reaches the guest
//! as a disconnect, which kills the command, exactly as for in-process execs. Only
//! per-command requests pass; `Shutdown` is refused (that is the owner's decision).
//! Allow-list changes (`matchlock allow-list`) are answered by the relay itself: the
//! policy lives in the owner, never in the guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matchlock_guest_proto::{AllowListResult, AllowListUpdate, ExecRequest, Frame, FrameType};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::codec::{read_frame, write_frame};
use crate::sandbox::error_chain;
use crate::Sandbox;

/// File name of the relay socket inside the VM's state dir.
pub const SOCKET_NAME: &str = "exec.sock";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("bind exec relay at {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exec socket not found for {id} (is the sandbox running?)")]
    NoSocket { id: String },
    #[error("connect to exec relay {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("send the allow-list update")]
    AllowListSend(#[source] matchlock_guest_proto::ProtoError),
    #[error("read the allow-list answer")]
    AllowListReply(#[source] matchlock_guest_proto::ProtoError),
    #[error("the sandbox's owner closed the connection without answering")]
    AllowListNoReply,
    #[error("{0}")]
    AllowListRefused(String),
    #[error("unexpected {0:?} frame in answer to an allow-list update")]
    AllowListUnexpected(FrameType),
    #[error("decode the allow-list answer")]
    AllowListDecode(#[source] matchlock_guest_proto::ProtoError),
}

/// Asks the owner of the sandbox in `vm_dir` to add (`add`) or remove `hosts` from its
/// allow-list.
pub async fn update_allow_list(
    id: &str,
    vm_dir: &Path,
    add: bool,
    hosts: Vec<String>,
) -> Result<AllowListResult, RelayError> {
    let mut conn = connect(id, vm_dir).await?;
    let kind = if add {
        FrameType::AllowListAdd
    } else {
        FrameType::AllowListDelete
    };
    let frame =
        Frame::json(kind, &AllowListUpdate { hosts }).map_err(RelayError::AllowListDecode)?;
    write_frame(&mut conn, &frame)
        .await
        .map_err(RelayError::AllowListSend)?;
    let reply = read_frame(&mut conn)
        .await
        .map_err(RelayError::AllowListReply)?
        .ok_or(RelayError::AllowListNoReply)?;
    match reply.kind {
        FrameType::AllowList => reply
            .parse("allow-list answer")
            .map_err(RelayError::AllowListDecode),
        FrameType::Error => Err(RelayError::AllowListRefused(
            String::from_utf8_lossy(&reply.payload).into_owned(),
        )),
        other => Err(RelayError::AllowListUnexpected(other)),
    }
}

/// Binds the relay socket in `vm_dir`.
pub fn bind(vm_dir: &Path) -> Result<UnixListener, RelayError> {
    let path = vm_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(|source| RelayError::Bind { path, source })
}

/// Serves relay connections until `shutdown` fires.
pub async fn serve(listener: UnixListener, sandbox: Arc<Sandbox>, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            () = shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let sandbox = sandbox.clone();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = handle(stream, &sandbox) => {
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "exec relay connection ended with an error");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "exec relay accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut client: UnixStream,
    sandbox: &Sandbox,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(first) = read_frame(&mut client).await? else {
        return Ok(());
    };
    let opened = match first.kind {
        FrameType::Exec => {
            let req: ExecRequest = first.parse("exec")?;
            match sandbox.open_exec(req).await {
                Ok((guest, req)) => Ok((guest, Frame::json(FrameType::Exec, &req)?)),
                Err(e) => Err(e),
            }
        }
        FrameType::AllowListAdd | FrameType::AllowListDelete => {
            return allow_list(&mut client, sandbox, &first).await;
        }
        FrameType::WriteFile
        | FrameType::ReadFile
        | FrameType::ListFiles
        | FrameType::PortForward => sandbox.link().connect().await.map(|g| (g, first)),
        other => {
            let msg = format!("{other:?} requests are not accepted by the exec relay");
            write_frame(&mut client, &Frame::new(FrameType::Error, msg.into_bytes())).await?;
            return Ok(());
        }
    };
    let (mut guest, forward) = match opened {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("connect to guest: {}", error_chain(&e));
            write_frame(&mut client, &Frame::new(FrameType::Error, msg.into_bytes())).await?;
            return Ok(());
        }
    };
    write_frame(&mut guest, &forward).await?;
    tokio::io::copy_bidirectional(&mut client, &mut guest).await?;
    Ok(())
}

/// Answers an allow-list change itself (the guest never sees these frames).
async fn allow_list(
    client: &mut UnixStream,
    sandbox: &Sandbox,
    frame: &Frame,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let update: AllowListUpdate = frame.parse("allow-list update")?;
    let result = match sandbox.network() {
        None => Err(crate::network::AllowListError::NoInterception),
        Some(net) if frame.kind == FrameType::AllowListAdd => net.allow(&update.hosts),
        Some(net) => net.disallow(&update.hosts),
    };
    let reply = match result {
        Ok(c) => Frame::json(
            FrameType::AllowList,
            &AllowListResult {
                changed: c.changed,
                allowed_hosts: c.allowed_hosts,
            },
        )?,
        Err(e) => Frame::new(FrameType::Error, e.to_string().into_bytes()),
    };
    write_frame(client, &reply).await?;
    Ok(())
}

/// Connects to the relay of the sandbox whose state dir is `vm_dir`.
pub async fn connect(id: &str, vm_dir: &Path) -> Result<UnixStream, RelayError> {
    let path = vm_dir.join(SOCKET_NAME);
    if !path.exists() {
        return Err(RelayError::NoSocket { id: id.to_string() });
    }
    UnixStream::connect(&path)
        .await
        .map_err(|source| RelayError::Connect { path, source })
}
