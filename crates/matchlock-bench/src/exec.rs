//! `-- exec`: warm `exec true` into a running sandbox through every path (in-process, the
//! exec relay socket, `matchlock rpc`, the `matchlock exec` CLI), the emulated floor of the
//! same run (`floor.rs`), and a per-exec timeline of the in-process path.
//!
//! # Design
//! Every row runs on one sandbox booted in this process, on the host channel the sandbox
//! layer picks (`MATCHLOCK_DEV_CHANNEL`; printed), so the floor's "new connection + Ping" is
//! exactly what each exec opens: a vsock connection, or a new mux stream on the
//! virtio-serial channel. The timeline asks the guest for its own marks
//! ([`matchlock_guest_proto::GuestTiming`], sent back in `Exit`) and sets them beside the
//! host's: the host and guest clocks are not comparable, so each segment is a difference of
//! marks on one side, and what neither side accounts for is the channel (both directions)
//! plus wake-ups.
//!
//! # Limitations
//! The timeline covers the in-process path only; the CLI's extra cost is a separate row
//! (`matchlock exec` minus the relay row). Medians per segment do not add up exactly to the
//! median total.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use matchlock_guest_proto::{Frame, FrameType};
use matchlock_sandbox::exec::ExecTimeline;
use matchlock_sandbox::RunningSandbox;

use crate::{exec_true, floor, median, ms, Bench, IMAGE};

/// Warm-exec medians of one run.
struct ExecRows {
    raw: Duration,
    fresh: Duration,
    inproc: Duration,
    relay: Duration,
    cli: Duration,
    spawn: Duration,
    timelines: Vec<ExecTimeline>,
    /// QEMU's CPU time per in-process exec (idle rate subtracted), if QEMU was found.
    cpu: Option<Duration>,
}

/// The pid of the QEMU process serving the VM in `vm_dir` (its command line names the dir).
fn qemu_pid(vm_dir: &std::path::Path) -> Option<u32> {
    let needle = vm_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.starts_with("qemu-system") || cmd.contains("/qemu-system"))
            .then_some(())
            .filter(|()| cmd.contains(&needle))
            .map(|()| pid)
    })
}

/// utime + stime of `pid` (clock ticks of 10 ms).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// QEMU's CPU time per exec over `n` in-process `exec true`, its idle rate (measured over
/// one second first) subtracted: the emulated work of an exec, which the host's load
/// inflates far less than wall-clock times.
async fn cpu_per_exec(sb: &RunningSandbox, n: u32) -> anyhow::Result<Option<Duration>> {
    let Some(pid) = qemu_pid(sb.dir()) else {
        return Ok(None);
    };
    let tick = Duration::from_millis(10);
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c1, t1) = (cpu_ticks(pid), Instant::now());
    for _ in 0..n {
        let (req, io) = exec_true();
        sb.exec(req, io).await?;
    }
    let (c2, t2) = (cpu_ticks(pid), Instant::now());
    let (Some(c0), Some(c1), Some(c2)) = (c0, c1, c2) else {
        return Ok(None);
    };
    let idle = tick
        .mul_f64((c1 - c0) as f64)
        .div_f64((t1 - t0).as_secs_f64());
    let busy = tick.mul_f64((c2 - c1) as f64);
    let spent = busy.saturating_sub(idle.mul_f64((t2 - t1).as_secs_f64()));
    Ok(Some(spent / n))
}

/// Which host channel the sandbox layer uses (the knob it reads).
fn channel_name() -> &'static str {
    match matchlock_vm::Channel::from_env() {
        Ok(matchlock_vm::Channel::Serial) => "virtio-serial (mux stream per exec)",
        Ok(matchlock_vm::Channel::Vsock) => "vsock (vhost-device-vsock, connection per exec)",
        Err(_) => "invalid MATCHLOCK_DEV_CHANNEL",
    }
}

impl Bench {
    pub(crate) fn exec(&self) -> anyhow::Result<()> {
        let spec = self.spec()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let result = rt.block_on(async {
            let sb = self.start_in_process(spec).await?;
            let r = self.exec_rows(&sb).await;
            sb.close(Duration::from_secs(2), "benchmark done").await?;
            let _ = sb.remove();
            r
        });
        drop(rt);
        let r = result?;
        let rpc = self.rpc_exec_roundtrip(self.runs * 10)?;
        let ratio = |d: Duration| d.as_secs_f64() / r.raw.as_secs_f64();
        println!("warm exec (medians; host channel: {}):", channel_name());
        println!("  raw round trip (Ping/Pong, open conn):  {}", ms(r.raw));
        println!(
            "  new connection + Ping/Pong:             {}  ratio {:.1}x",
            ms(r.fresh),
            ratio(r.fresh)
        );
        println!(
            "  exec true, in-process (Sandbox::exec):  {}  ratio {:.1}x",
            ms(r.inproc),
            ratio(r.inproc)
        );
        println!(
            "  exec true through the exec relay:       {}  ratio {:.1}x",
            ms(r.relay),
            ratio(r.relay)
        );
        println!(
            "  exec(\"true\") through matchlock rpc:     {}  ratio {:.1}x (vs relay {:.2}x)",
            ms(rpc),
            ratio(rpc),
            rpc.as_secs_f64() / r.relay.as_secs_f64()
        );
        println!(
            "  matchlock exec true (CLI + exec relay): {}  ratio {:.1}x",
            ms(r.cli),
            ratio(r.cli)
        );
        floor::print(&floor::Rows {
            fresh: r.fresh,
            spawn: r.spawn,
            inproc: r.inproc,
            relay: r.relay,
            rpc,
            cli: r.cli,
        });
        floor::print_timeline(&r.timelines, r.fresh);
        if let Some(cpu) = r.cpu {
            println!(
                "  QEMU CPU per in-process exec true (idle rate subtracted): {}",
                ms(cpu)
            );
        }
        Ok(())
    }

    /// The warm-exec rows measured on one running sandbox (medians).
    async fn exec_rows(&self, sb: &RunningSandbox) -> anyhow::Result<ExecRows> {
        let n = self.runs * 10;
        // Raw round trip: Ping/Pong on one open connection.
        let mut conn = sb.link().connect().await?;
        let ping = Frame::new(FrameType::Ping, vec![1]);
        let mut raw = Vec::new();
        for _ in 0..n * 4 {
            let t = Instant::now();
            matchlock_sandbox::codec::write_frame(&mut conn, &ping).await?;
            let f = matchlock_sandbox::codec::read_frame(&mut conn)
                .await?
                .context("pong")?;
            raw.push(t.elapsed());
            if f.kind != FrameType::Pong {
                bail!("expected Pong, got {:?}", f.kind);
            }
        }
        drop(conn);
        // A fresh connection per request (what every exec pays before the command runs).
        let mut fresh = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let mut c = sb.link().connect().await?;
            matchlock_sandbox::codec::write_frame(&mut c, &ping).await?;
            matchlock_sandbox::codec::read_frame(&mut c)
                .await?
                .context("pong")?;
            fresh.push(t.elapsed());
        }
        let mut inproc = Vec::new();
        for _ in 0..n {
            let (req, io) = exec_true();
            let t = Instant::now();
            let st = sb.exec(req, io).await?;
            inproc.push(t.elapsed());
            if st.code != 0 {
                bail!("exec true exited {}", st.code);
            }
        }
        let mut timelines = Vec::new();
        for _ in 0..n {
            let (req, io) = exec_true();
            let (st, timeline) = sb.exec_timed(req, io).await?;
            if st.code != 0 {
                bail!("timed exec true exited {}", st.code);
            }
            timelines.push(timeline);
        }
        // exec true through the exec relay socket (what other processes use), no
        // process spawn: isolates the relay's cost.
        let mut relay = Vec::new();
        for _ in 0..n {
            let (req, io) = exec_true();
            let t = Instant::now();
            let c = matchlock_sandbox::relay::connect(sb.id(), sb.dir()).await?;
            let st = matchlock_sandbox::exec::run_exec(c, &req, io).await?;
            relay.push(t.elapsed());
            if st.code != 0 {
                bail!("relay exec true exited {}", st.code);
            }
        }
        let mut cli = Vec::new();
        for _ in 0..self.runs * 4 {
            let t = Instant::now();
            let st = tokio::process::Command::new(&self.bin)
                .env("HOME", self.home.path())
                .env("XDG_CACHE_HOME", self.home.path().join(".cache"))
                .args(["exec", sb.id(), "true"])
                .status()
                .await?;
            cli.push(t.elapsed());
            if !st.success() {
                bail!("matchlock exec failed: {st}");
            }
        }
        let spawn = floor::guest_spawn(&self.bin, self.home.path(), sb.id()).await?;
        let cpu = cpu_per_exec(sb, 50).await?;
        Ok(ExecRows {
            raw: median(raw),
            fresh: median(fresh),
            inproc: median(inproc),
            relay: median(relay),
            cli: median(cli),
            spawn,
            timelines,
            cpu,
        })
    }

    /// Median round trip of `exec {"command":"true"}` through a `matchlock rpc` process
    /// (JSON line out, response line back), on its own sandbox.
    fn rpc_exec_roundtrip(&self, n: usize) -> anyhow::Result<Duration> {
        use std::io::{BufRead, Write};
        let mut child = self
            .matchlock()
            .arg("rpc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn matchlock rpc")?;
        let mut input = child.stdin.take().context("rpc stdin")?;
        let mut output = std::io::BufReader::new(child.stdout.take().context("rpc stdout")?);
        let mut call = |id: usize, method: &str, params: &str| -> anyhow::Result<String> {
            writeln!(
                input,
                r#"{{"jsonrpc":"2.0","method":"{method}","params":{params},"id":{id}}}"#
            )?;
            input.flush()?;
            let mut line = String::new();
            if output.read_line(&mut line)? == 0 {
                bail!("matchlock rpc exited");
            }
            if line.contains(r#""error""#) {
                bail!("rpc {method} failed: {line}");
            }
            Ok(line)
        };
        call(
            1,
            "create",
            &format!(r#"{{"image":"{IMAGE}","resources":{{"disk_size_mb":256}}}}"#),
        )?;
        let mut times = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            let line = call(i + 2, "exec", r#"{"command":"true"}"#)?;
            times.push(t.elapsed());
            if !line.contains(r#""exit_code":0"#) {
                bail!("rpc exec true: {line}");
            }
        }
        call(n + 2, "close", r#"{"timeout_seconds":2}"#)?;
        drop(input);
        child.wait()?;
        Ok(median(times))
    }
}
