//! Host <-> guest wire protocol, spoken over vsock or over the multiplexed virtio-serial
//! channel ([`mux`]), which carries the same connections as logical streams.
//!
//! # Design
//! Every message is one frame: a 1-byte [`FrameType`], a 4-byte big-endian payload length and
//! the payload. Control messages carry JSON (small, versionable, easy to debug); bulk data
//! (stdout, stderr, stdin, file contents) is carried raw, never base64. Frames are written
//! whole by one writer at a time (see [`FrameWriter`]), so frames never interleave.
//!
//! Connections:
//! - **Boot / readiness** ([`READY_PORT`], guest -> host): the guest's init dials the host as
//!   soon as vsock is up and sends [`FrameType::Hello`]. The host answers with
//!   [`FrameType::BootConfig`] (hostname, hosts, DNS, disks...). The guest assembles its root,
//!   then sends [`FrameType::Ready`] (with its [`ReadyTimes`]) or [`FrameType::BootFailed`].
//!   Readiness is this handshake, never a sleep or a poll.
//! - **Service** ([`SERVICE_PORT`], host -> guest): one request per connection. The first frame
//!   selects the session: [`FrameType::Exec`], [`FrameType::WriteFile`],
//!   [`FrameType::ReadFile`], [`FrameType::ListFiles`], [`FrameType::PortForward`],
//!   [`FrameType::Shutdown`], [`FrameType::Ping`] (answered by `Pong`, repeatedly).
//!
//! Exec session: host sends `Exec` (JSON [`ExecRequest`]); the guest answers `Started` (or
//! `Error` then closes), then streams `Stdout`/`Stderr` (in TTY mode all output is `Stdout`),
//! and finally `Exit` (JSON [`ExitStatus`]). While it runs the host may send `Stdin`,
//! `StdinEof` (pipe mode), `Resize` and `Signal`. If the host closes the connection before
//! `Exit`, the guest kills the command's whole process group (SIGTERM, then SIGKILL after
//! [`KILL_GRACE_MS`]) in every mode.
//!
//! File sessions: `WriteFile` header then `Data` chunks then `DataEnd`; the guest replies `Ok`
//! or `Error`. `ReadFile` -> `FileInfo`, `Data` chunks, `DataEnd` (or `Error`). `ListFiles` ->
//! zero or more `FileList` frames, each a batch of entries of at most [`LIST_CHUNK`] payload
//! bytes, then `FileListEnd`; an `Error` may replace any of them and ends the session. A
//! listing can be much larger than one frame, so it is streamed; the receiver bounds how
//! much it accumulates (protocol version 2; version 1 sent one `FileList` frame).
//!
//! # Limitations
//! Payloads are bounded by [`MAX_PAYLOAD`]; larger data is chunked by the sender.

#![forbid(unsafe_code)]

pub mod mux;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version exchanged in [`Hello`]; bump on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 2;
/// vsock port the guest listens on for service connections (host -> guest).
pub const SERVICE_PORT: u32 = 5000;
/// vsock port the host listens on for the guest's boot handshake (guest -> host).
pub const READY_PORT: u32 = 5002;
/// Guest context id used for every VM (each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;
/// Largest payload any peer accepts; bigger data is split into several frames.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Chunk size used for bulk data (output, stdin, files).
pub const CHUNK: usize = 64 * 1024;
/// Grace period between SIGTERM and SIGKILL when a command is cancelled.
pub const KILL_GRACE_MS: u64 = 2000;
/// Payload budget of one `FileList` frame (a batch of a streamed directory listing).
pub const LIST_CHUNK: usize = CHUNK;
/// Largest file `ReadFile` will return.
pub const MAX_READ_FILE: u64 = 16 << 20;

/// Size of the frame header.
pub const HEADER_LEN: usize = 5;
/// How a `BootFailed` reason starts when the guest's timer check failed (its timer
/// interrupts never fired; seen only on heavily overloaded TCG hosts). The host boots such a
/// VM again once instead of failing the sandbox.
pub const TIMER_DEAD_REASON: &str = "checking the guest timer";

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("reading frame header")]
    ReadHeader(#[source] io::Error),
    #[error("reading frame payload of {len} bytes")]
    ReadPayload {
        len: u32,
        #[source]
        source: io::Error,
    },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge { len: u32 },
    #[error("writing frame")]
    Write(#[source] io::Error),
    #[error("decoding {what} message")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding message")]
    Encode(#[source] serde_json::Error),
    #[error("malformed {what} payload: expected {expected} bytes, got {got}")]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("unexpected frame {got:?} while waiting for {expected}")]
    Unexpected {
        got: FrameType,
        expected: &'static str,
    },
    #[error("peer closed the connection")]
    Closed,
}

macro_rules! frame_types {
    ($($(#[$m:meta])* $name:ident = $n:expr,)*) => {
        /// The type byte of a frame.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType { $($(#[$m])* $name = $n,)* }

        impl TryFrom<u8> for FrameType {
            type Error = ProtoError;
            fn try_from(v: u8) -> Result<Self, ProtoError> {
                match v {
                    $($n => Ok(FrameType::$name),)*
                    other => Err(ProtoError::UnknownType(other)),
                }
            }
        }
    };
}

frame_types! {
    /// G->H (ready port): JSON [`Hello`].
    Hello = 1,
    /// H->G (ready port): JSON [`BootConfig`].
    BootConfig = 2,
    /// G->H (ready port): empty; the guest is ready for service connections.
    Ready = 3,
    /// G->H (ready port): UTF-8 reason; boot failed, the guest will power off.
    BootFailed = 4,
    /// H->G: JSON [`ExecRequest`].
    Exec = 10,
    /// G->H: JSON [`Started`]; the command is running.
    Started = 11,
    /// G->H: raw stdout bytes (all output in TTY mode).
    Stdout = 12,
    /// G->H: raw stderr bytes.
    Stderr = 13,
    /// H->G: raw stdin bytes.
    Stdin = 14,
    /// H->G: empty; close the command's stdin.
    StdinEof = 15,
    /// H->G: 4 bytes, rows u16 BE then cols u16 BE.
    Resize = 16,
    /// H->G: 1 byte signal number, delivered to the command's process group.
    Signal = 17,
    /// G->H: JSON [`ExitStatus`]; last frame of an exec session.
    Exit = 18,
    /// G->H: UTF-8 error message; last frame of a failed session.
    Error = 19,
    /// H->G: JSON [`WriteFileRequest`], followed by `Data` frames and `DataEnd`.
    WriteFile = 30,
    /// H->G: JSON [`PathRequest`].
    ReadFile = 31,
    /// H->G: JSON [`PathRequest`].
    ListFiles = 32,
    /// Either way: raw file bytes.
    Data = 33,
    /// Either way: empty; end of `Data`.
    DataEnd = 34,
    /// G->H: JSON [`FileInfo`], before the `Data` of a read.
    FileInfo = 35,
    /// G->H: JSON [`FileList`], one batch of a listing (at most [`LIST_CHUNK`] bytes).
    FileList = 36,
    /// G->H: empty; the request succeeded.
    Ok = 37,
    /// G->H: empty; the last frame of a complete listing.
    FileListEnd = 38,
    /// H->G: JSON [`PortForwardRequest`]; on success the guest answers `Ok` and the
    /// connection becomes a raw byte pipe to the TCP peer.
    PortForward = 40,
    /// H->G: empty; sync, stop every process, unmount and power off. Answered `Ok` first.
    Shutdown = 50,
    /// H->G: any payload (at most [`MAX_PAYLOAD`]); the guest answers `Pong` with the same
    /// payload, and keeps doing so for every `Ping` on the connection until EOF. Used for
    /// liveness checks and to measure the raw vsock round trip.
    Ping = 60,
    /// G->H: the payload of the `Ping` it answers.
    Pong = 61,
    /// Client->relay only (never sent to a guest): JSON [`AllowListUpdate`]; add hosts to the
    /// sandbox's allow-list. Answered `AllowList` or `Error`.
    AllowListAdd = 70,
    /// Client->relay only: JSON [`AllowListUpdate`]; remove hosts.
    AllowListDelete = 71,
    /// Relay->client: JSON [`AllowListResult`].
    AllowList = 72,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameType, payload: Vec<u8>) -> Self {
        Frame { kind, payload }
    }

    pub fn empty(kind: FrameType) -> Self {
        Frame {
            kind,
            payload: Vec::new(),
        }
    }

    /// A frame carrying `msg` as JSON.
    pub fn json<T: Serialize>(kind: FrameType, msg: &T) -> Result<Self, ProtoError> {
        Ok(Frame {
            kind,
            payload: serde_json::to_vec(msg).map_err(ProtoError::Encode)?,
        })
    }

    /// Decodes the JSON payload.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self, what: &'static str) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::Decode { what, source })
    }

    /// Decodes the JSON payload, failing with [`ProtoError::Unexpected`] if the type differs.
    pub fn expect<'a, T: Deserialize<'a>>(
        &'a self,
        kind: FrameType,
        what: &'static str,
    ) -> Result<T, ProtoError> {
        if self.kind != kind {
            return Err(ProtoError::Unexpected {
                got: self.kind,
                expected: what,
            });
        }
        self.parse(what)
    }

    /// Encodes header and payload into one buffer, so one `write_all` sends the whole frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or(ProtoError::TooLarge {
                len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
            })?;
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        buf.push(self.kind as u8);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&self.payload);
        Ok(buf)
    }

    /// Parses a frame header, validating type and length.
    pub fn decode_header(header: [u8; HEADER_LEN]) -> Result<(FrameType, u32), ProtoError> {
        let kind = FrameType::try_from(header[0])?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge { len });
        }
        Ok((kind, len))
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed,
    /// otherwise the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        let (kind, len) = Frame::decode_header(h)?;
        let end = HEADER_LEN + len as usize;
        match buf.get(HEADER_LEN..end) {
            Some(payload) => Ok(Some((Frame::new(kind, payload.to_vec()), end))),
            None => Ok(None),
        }
    }
}

/// Reads one frame; `Ok(None)` on a clean EOF at a frame boundary.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtoError::ReadHeader(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::ReadHeader(e)),
        }
    }
    let (kind, len) = Frame::decode_header(header)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|source| ProtoError::ReadPayload { len, source })?;
    Ok(Some(Frame::new(kind, payload)))
}

/// Reads one frame, treating EOF as [`ProtoError::Closed`].
pub fn read_frame_required<R: Read>(r: &mut R) -> Result<Frame, ProtoError> {
    read_frame(r)?.ok_or(ProtoError::Closed)
}

/// Writes one frame with a single `write_all` and flushes.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtoError> {
    let buf = frame.encode()?;
    w.write_all(&buf).map_err(ProtoError::Write)?;
    w.flush().map_err(ProtoError::Write)
}

/// A writer shared by several threads; each frame is written under the lock, so frames from
/// concurrent producers (stdout and stderr pumps) never interleave.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: std::sync::Mutex<W>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            inner: std::sync::Mutex::new(w),
        }
    }

    pub fn send(&self, frame: &Frame) -> Result<(), ProtoError> {
        let buf = frame.encode()?;
        let mut w = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.write_all(&buf).map_err(ProtoError::Write)?;
        w.flush().map_err(ProtoError::Write)
    }
}

/// Guest -> host greeting on the ready port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
}

/// Guest-side boot times carried by [`FrameType::Ready`], in microseconds of the guest's
/// `CLOCK_BOOTTIME` (zero when the kernel started): when `/init` began, when it sent `Hello`,
/// and when it sent `Ready`. The host turns them into the cold-start breakdown. Older guests
/// send `Ready` with an empty payload; hosts treat a missing or malformed payload as "no
/// times", never as a failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyTimes {
    pub init_us: u64,
    pub hello_us: u64,
    pub ready_us: u64,
}

/// An extra `/etc/hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub host: String,
    pub ip: String,
}

/// What a block device is for; the guest finds devices by their virtio serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// virtio-blk serial (at most 20 bytes), read from `/sys/block/vdX/serial`.
    pub serial: String,
    pub role: DiskRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskRole {
    /// Read-only image layer (squashfs); lowers are listed bottom-most first.
    Lower { fs: String },
    /// The per-VM writable overlay upper (ext4).
    Upper,
    /// An extra ext4 disk mounted at `mount`.
    Extra { mount: String, readonly: bool },
}

/// Host -> guest configuration sent during the boot handshake.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootConfig {
    pub hostname: String,
    #[serde(default)]
    pub add_hosts: Vec<HostEntry>,
    #[serde(default)]
    pub dns_servers: Vec<String>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// CPU quota as a fraction of vCPUs (`--cpus 0.5`), applied with cgroup2 `cpu.max`.
    #[serde(default)]
    pub cpus: f64,
    /// Skip per-exec hardening (capability drop, no_new_privs).
    #[serde(default)]
    pub privileged: bool,
    /// Wall-clock time (Unix seconds, nanoseconds) to set, since the guest has no RTC sync.
    #[serde(default)]
    pub now_unix: (i64, u32),
    /// The guest NIC's IPv4 settings (`eth0`); absent when the VM has no NIC.
    #[serde(default)]
    pub net: Option<GuestNet>,
    /// PEM of the host's interception CA, installed into the guest's trust (absent: no
    /// interception).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Where to mount the workspace's virtio-fs share (tag [`WORKSPACE_TAG`]); absent: no
    /// workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Host random bytes the guest credits to its kernel's pool (`RNDADDENTROPY`) before
    /// forcing a CRNG reseed, so VMs restored from one snapshot do not share random state
    /// (empty: none sent; at most 256 bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub random_seed: Vec<u8>,
    /// This sandbox's `/etc/machine-id`: 32 lowercase hex digits, fresh per sandbox (a
    /// restored VM must not keep the snapshot's). Empty: the image's file is left alone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_id: String,
}

/// The virtio-fs mount tag of the workspace share.
pub const WORKSPACE_TAG: &str = "matchlock";

/// Static IPv4 settings of the guest's only NIC (no DHCP: they come with the boot config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub address: std::net::Ipv4Addr,
    /// Prefix length of the guest's subnet (1..=30).
    pub prefix_len: u8,
    /// Default gateway (the host's stack); also the guest's DNS server.
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u16,
    /// Static IPv6 settings of the same NIC (absent: IPv4 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<GuestNet6>,
}

/// Static IPv6 settings of the guest's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet6 {
    pub address: std::net::Ipv6Addr,
    /// Prefix length of the guest's subnet (1..=126).
    pub prefix_len: u8,
    /// Default gateway (the host's stack).
    pub gateway: std::net::Ipv6Addr,
}

/// Window size of a TTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl WinSize {
    pub fn encode(self) -> Vec<u8> {
        let mut v = self.rows.to_be_bytes().to_vec();
        v.extend_from_slice(&self.cols.to_be_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Self, ProtoError> {
        match p {
            [r0, r1, c0, c1] => Ok(WinSize {
                rows: u16::from_be_bytes([*r0, *r1]),
                cols: u16::from_be_bytes([*c0, *c1]),
            }),
            _ => Err(ProtoError::BadLength {
                what: "resize",
                expected: 4,
                got: p.len(),
            }),
        }
    }
}

/// A command to run. `argv[0]` is looked up in the `PATH` of `env`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// The complete environment of the command (the host has already merged image, config
    /// and request env). The guest adds only `HOME` when absent.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; empty means `/`.
    #[serde(default)]
    pub cwd: String,
    /// `uid`, `uid:gid`, `name` or `name:group`, resolved in the guest's `/etc/passwd` and
    /// `/etc/group`; empty means root.
    #[serde(default)]
    pub user: String,
    /// Keep stdin open and accept `Stdin`/`StdinEof` frames; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run under a PTY of this size (stdin implied; all output arrives as `Stdout`).
    #[serde(default)]
    pub tty: Option<WinSize>,
    /// Ask for the guest's per-step timing in the `Exit` frame ([`TimedExit`]); for the
    /// benchmark's exec timeline. Absent means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timing: bool,
}

/// Where one exec session's time went inside the guest, in microseconds of the guest's
/// `CLOCK_MONOTONIC` since the agent accepted the connection. Only sent when the request
/// asked for it ([`ExecRequest::timing`]); the host's clock is not comparable, so the host
/// relates these to its own marks by differences only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTiming {
    /// The session's thread runs.
    pub session_us: u64,
    /// The `Exec` frame is read and decoded.
    pub request_us: u64,
    /// The command's process exists (the spawn returned).
    pub spawned_us: u64,
    /// `Started` is written.
    pub started_us: u64,
    /// The command's exit is seen (pidfd readable, or the reaper's status).
    pub exited_us: u64,
    /// `Exit` is about to be written (output drained).
    pub exit_us: u64,
}

/// The `Exit` payload when timing was asked for: [`ExitStatus`]'s fields plus `timing`
/// (a host that parses it as `ExitStatus` ignores the extra field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedExit {
    #[serde(flatten)]
    pub status: ExitStatus,
    #[serde(default)]
    pub timing: Option<GuestTiming>,
}

/// Sent once the command's process exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: i32,
}

/// How a command ended. `code` follows shell conventions: the exit status, or 128+n for a
/// command killed by signal n; 127 when the command was not found, 126 when not executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits; 0 means 0644.
    #[serde(default)]
    pub mode: u32,
    /// Owner as in [`ExecRequest::user`]; empty means root.
    #[serde(default)]
    pub user: String,
}

/// An allow-list change sent to a sandbox's owner through its relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowListUpdate {
    pub hosts: Vec<String>,
}

/// The owner's answer to an [`AllowListUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowListResult {
    /// Hosts added or removed, in order.
    pub changed: Vec<String>,
    /// The allow-list now (empty: every host allowed).
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// POSIX `st_mode` (type and permission bits).
    pub mode: u32,
    pub is_dir: bool,
}

/// One batch of a directory listing; a listing is the concatenation of its batches, in no
/// particular order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForwardRequest {
    #[serde(default = "default_forward_host")]
    pub host: String,
    pub port: u16,
    /// After `Ok`, carry the bytes as `Data` frames both ways, with `DataEnd` marking a
    /// half-close, instead of a raw pipe. Hybrid vsock transports (vhost-device-vsock,
    /// Firecracker) turn a unix-socket half-close into a full close, so only the framed
    /// form can honour half-close. Absent (false) = the raw pipe, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub framed: bool,
}

fn default_forward_host() -> String {
    "127.0.0.1".to_string()
}

#[cfg(test)]
mod tests {

    /// A timed `Exit` still parses as a plain [`ExitStatus`] (older hosts), and a request
    /// without timing does not carry the field (older guests).
    #[test]
    fn timed_exit_is_compatible() {
        let timed = TimedExit {
            status: ExitStatus {
                code: 3,
                signal: None,
            },
            timing: Some(GuestTiming {
                exit_us: 9,
                ..Default::default()
            }),
        };
        let f = Frame::json(FrameType::Exit, &timed).expect("json");
        let plain: ExitStatus = f.parse("exit").expect("plain");
        assert_eq!(plain.code, 3);
        let back: TimedExit = f.parse("exit").expect("timed");
        assert_eq!(back, timed);
        let req = Frame::json(FrameType::Exec, &ExecRequest::default()).expect("json");
        assert!(!String::from_utf8_lossy(&req.payload).contains("timing"));
    }
    use super::*;

    #[test]
    fn roundtrip_through_reader() {
        let req = ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            ..Default::default()
        };
        let f = Frame::json(FrameType::Exec, &req).expect("encode");
        let mut buf = Vec::new();
        write_frame(&mut buf, &f).expect("write");
        write_frame(&mut buf, &Frame::empty(FrameType::StdinEof)).expect("write");
        let mut r = buf.as_slice();
        let got = read_frame_required(&mut r).expect("frame");
        assert_eq!(
            got.expect::<ExecRequest>(FrameType::Exec, "exec")
                .expect("json"),
            req
        );
        assert_eq!(
            read_frame_required(&mut r).expect("frame").kind,
            FrameType::StdinEof
        );
        assert!(read_frame(&mut r).expect("eof").is_none());
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let mut h = [FrameType::Stdout as u8, 0, 0, 0, 0];
        h[1..].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(matches!(
            Frame::decode(&h),
            Err(ProtoError::TooLarge { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0xEE, 0, 0, 0, 0]),
            Err(ProtoError::UnknownType(0xEE))
        ));
    }

    #[test]
    fn truncated_frames() {
        let f = Frame::new(FrameType::Stdout, b"hello".to_vec())
            .encode()
            .expect("enc");
        for cut in 0..f.len() {
            assert!(Frame::decode(&f[..cut]).expect("partial").is_none());
            let mut r = &f[..cut];
            let res = read_frame(&mut r);
            if cut == 0 {
                assert!(res.expect("eof").is_none());
            } else {
                assert!(res.is_err());
            }
        }
        let (frame, used) = Frame::decode(&f).expect("ok").expect("complete");
        assert_eq!(used, f.len());
        assert_eq!(frame.payload, b"hello");
    }

    #[test]
    fn winsize() {
        let w = WinSize { rows: 24, cols: 80 };
        assert_eq!(WinSize::decode(&w.encode()).expect("decode"), w);
        assert!(WinSize::decode(&[1, 2, 3]).is_err());
    }
}
