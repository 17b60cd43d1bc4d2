//! `matchlock run`: boot a sandbox from an image and run a command in it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;

use anyhow::Context;
use clap::{ArgAction, Args};
use matchlock_api::{
    Config, ExtraDisk, ImageConfig, ImageOverrides, MountConfig, NetworkConfig, Resources,
    VfsConfig,
};
use matchlock_guest_proto::ExecRequest;
use matchlock_sandbox::forward::{self, PortMapping};
use matchlock_sandbox::paths::Paths;
use matchlock_sandbox::services::Services;
use matchlock_sandbox::signals::{Hangup, ShutdownSignals};
use matchlock_sandbox::{RunningSandbox, SandboxSpec, StartError, StartOptions, StopReason};
use matchlock_state::StateDb;
use tokio_util::sync::CancellationToken;

use super::common;
use super::exec::{drive, Mode, SessionEnd, Target};
use crate::ExitWith;

/// Boot a sandbox from an image and run a command in it.
///
/// The command is the image's ENTRYPOINT followed by the given arguments (or the image's CMD
/// when none are given), as with Docker. Output is streamed; the exit code is the command's.
///
/// Examples:
///   matchlock run --image busybox:local -- echo hello
///   matchlock run --image busybox:local -it sh
///   matchlock run --image busybox:local -d -- sh -c 'sleep 3600'   (prints the sandbox ID)
///   matchlock run --image busybox:local --rm=false                 (keep it running; stop with `matchlock kill`)
#[derive(Args, Debug, Clone)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Image to boot: a local tag, or a registry reference (pulled and cached on first use).
    #[arg(long, required = true)]
    pub image: String,
    /// Command and arguments (after `--` when they start with '-').
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to copy the host's value). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE per line, # comments). Repeatable.
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory for the command (default: image WORKDIR, else /).
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User: uid, uid:gid or a name from the image's /etc/passwd (overrides image USER; also
    /// applies to later `matchlock exec`).
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// Override the image ENTRYPOINT ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Guest hostname (default: the sandbox ID).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Extra /etc/hosts entry HOST:IP. Repeatable, comma-separated lists accepted.
    #[arg(long = "add-host", value_delimiter = ',', value_name = "HOST:IP")]
    pub add_host: Vec<String>,
    /// DNS servers the guest's queries are forwarded to (also listed in its resolv.conf).
    /// Default: the host's own resolver answers (/etc/hosts honoured).
    #[arg(long = "dns-servers", value_delimiter = ',', value_name = "IP")]
    pub dns_servers: Vec<String>,
    /// vCPUs; fractions become a CPU quota (0.5 = half a CPU).
    #[arg(long, default_value_t = 1.0)]
    pub cpus: f64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Size of the writable disk in MiB (sparse; only written blocks use host space).
    #[arg(long = "disk-size", default_value_t = 5120)]
    pub disk_size: u64,
    /// Kill the command and stop the sandbox after this many seconds (default: no limit).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Remove the sandbox when the command exits; --rm=false keeps it running until killed.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true", require_equals = true, overrides_with = "rm")]
    pub rm: bool,
    /// Cold boot this sandbox instead of restoring a cached post-boot snapshot.
    ///
    /// By default a sandbox is restored from a snapshot of a freshly booted VM (kept per
    /// kernel, guest runtime, memory, vCPUs and disk layout under
    /// ~/.cache/matchlock/snapshots, made by the first run of each kind), which starts it
    /// several times faster; each restore still gets its own clock, hostname, machine id and
    /// random seed. Use this flag to rule the snapshot out when debugging a boot, or to
    /// measure cold start. MATCHLOCK_NO_SNAPSHOT=1 does the same for every sandbox of a
    /// process (e.g. `matchlock rpc`). To clear the cache: rm -rf ~/.cache/matchlock/snapshots
    #[arg(long = "no-snapshot")]
    pub no_snapshot: bool,
    /// Run in the background and print the sandbox ID (implies --rm=false).
    #[arg(short = 'd', long = "detach", action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true", require_equals = true, overrides_with = "detach")]
    pub detach: bool,
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Allocate a terminal (use with -i).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// Skip the in-guest per-command hardening (the VM is still the boundary).
    #[arg(long)]
    pub privileged: bool,
    /// How long to let the guest shut down cleanly before it is stopped hard (e.g. 5s, 500ms).
    #[arg(long = "graceful-shutdown", value_parser = parse_duration, default_value = "0s")]
    pub graceful_shutdown: Duration,
    /// Attach an ext4 disk image: HOST_PATH:GUEST_MOUNT[:ro]. Repeatable.
    #[arg(long = "disk", value_name = "HOST:GUEST[:ro]")]
    pub disk: Vec<String>,
    /// No network interface in the guest at all.
    #[arg(long = "no-network")]
    pub no_network: bool,
    /// Allow egress only to these hosts (globs: api.example.com, *.example.com). Turns on
    /// HTTP/TLS interception; other TCP is allowed only to listed IP literals. Repeatable.
    #[arg(long = "allow-host", value_delimiter = ',')]
    pub allow_host: Vec<String>,
    /// Secret NAME=VALUE@host1,host2 or NAME@hosts (value from $NAME). The guest sees only
    /// a placeholder in $NAME; the host swaps in the value in requests to those hosts and
    /// refuses requests carrying it anywhere else. Repeatable.
    #[arg(long)]
    pub secret: Vec<String>,
    /// Intercept HTTP/TLS even without an allow-list or secrets (events for every request).
    #[arg(long = "network-intercept")]
    pub network_intercept: bool,
    /// Guest NIC MTU.
    #[arg(long, default_value_t = 1500)]
    pub mtu: i64,
    /// Forward host port LOCAL (default: REMOTE) to 127.0.0.1:REMOTE inside the sandbox
    /// ([LOCAL:]REMOTE). Repeatable. Works without a guest network.
    #[arg(short = 'p', long = "publish", value_name = "[LOCAL:]REMOTE")]
    pub publish: Vec<String>,
    /// Host address(es) the -p listeners bind (IP literal or localhost).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub address: Vec<String>,
    /// Mount a host directory or file into the workspace: HOST:GUEST[:ro|host_fs|overlay]
    /// (GUEST relative to --workspace or absolute inside it). Repeatable.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:OPT]")]
    pub volume: Vec<String>,
    /// Guest path where the workspace filesystem is mounted (required with -v).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Always pull the image from its registry, ignoring cached copies.
    #[arg(long)]
    pub pull: bool,
    /// Virtualization: auto (KVM when usable, else TCG emulation), kvm or tcg.
    #[arg(long, default_value = "auto", env = "MATCHLOCK_ACCEL")]
    pub accel: String,
}

/// Parses `500ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {s:?} (use e.g. 500ms, 5s, 2m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))
}

fn parse_disk(spec: &str) -> anyhow::Result<ExtraDisk> {
    let bad = |why: String| anyhow::anyhow!("invalid disk mount {spec:?}: {why}");
    let parts: Vec<&str> = spec.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts[0].trim().is_empty() || parts[1].trim().is_empty() {
        return Err(bad(
            "expected format host_path:guest_mount[:ro] or @volume_name:guest_mount[:ro]".into(),
        ));
    }
    let host = match parts[0].trim().strip_prefix('@') {
        Some(name) => {
            let paths = super::common::paths()?;
            super::volume::resolve(&paths, name).map_err(|e| bad(e.to_string()))?
        }
        None => {
            let host = std::path::absolute(parts[0].trim()).map_err(|e| bad(e.to_string()))?;
            if !host.exists() {
                return Err(bad(format!("host path does not exist: {}", host.display())));
            }
            host
        }
    };
    let guest = parts[1].trim();
    let guest_ok = guest.starts_with('/')
        && guest.len() > 1
        && guest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        && !guest.split('/').any(|c| c == "..");
    if !guest_ok {
        return Err(bad(format!(
            "invalid guest mount path {guest:?}: must be absolute and contain only alphanumeric, '/', '_', '.', '-'"
        )));
    }
    let readonly = match parts.get(2).map(|o| o.trim().to_ascii_lowercase()) {
        None => false,
        Some(o) if o == "ro" || o == "readonly" => true,
        Some(o) => return Err(bad(format!("unknown disk option {o:?} (use \"ro\")"))),
    };
    Ok(ExtraDisk {
        host_path: host.to_string_lossy().into_owned(),
        guest_mount: guest.to_string(),
        readonly,
    })
}

/// Everything validated before anything boots.
struct Plan {
    config: Config,
    argv: Vec<String>,
    image: matchlock_image::ImageRecord,
    image_config: matchlock_api::ImageConfig,
    mode: Mode,
    accel: matchlock_vm::Accel,
    publish: Vec<PortMapping>,
    addresses: Vec<std::net::IpAddr>,
}

/// Flags this build cannot honour yet are refused before anything starts.
fn refuse_unavailable(a: &RunArgs) -> anyhow::Result<()> {
    if a.no_network {
        for (set, flag) in [
            (!a.allow_host.is_empty(), "--allow-host"),
            (!a.secret.is_empty(), "--secret"),
            (a.network_intercept, "--network-intercept"),
        ] {
            if set {
                anyhow::bail!("--no-network cannot be combined with {flag}");
            }
        }
    }
    Ok(())
}

/// Go's `path.Clean` for guest paths: no empty, `.` or `..` components (`..` at the root
/// stays at the root), no trailing `/`.
fn clean_guest_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() && !p.starts_with('/') {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    if p.starts_with('/') {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

/// One `-v HOST:GUEST[:OPT]` (spec §1.3.3): the guest path and its mount.
fn parse_volume(spec: &str, workspace: &str) -> Result<(String, MountConfig), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err("expected format host:guest or host:guest:ro".to_string());
    }
    let host = std::path::absolute(parts[0])
        .map_err(|_| format!("host path does not exist: {}", parts[0]))?;
    if parts[0].is_empty() || std::fs::metadata(&host).is_err() {
        return Err(format!("host path does not exist: {}", host.display()));
    }
    let host_path = host
        .to_str()
        .ok_or_else(|| format!("host path is not UTF-8: {}", host.display()))?
        .to_string();
    let (kind, readonly) = match parts.get(2).map(|o| o.trim().to_ascii_lowercase()) {
        None => ("overlay", false),
        Some(o) if o == "overlay" => ("overlay", false),
        Some(o) if o == "host_fs" => ("host_fs", false),
        Some(o) if o == "ro" || o == "readonly" => ("host_fs", true),
        Some(_) => {
            return Err(format!(
                "unknown option {:?} (use 'ro', 'overlay', or 'host_fs')",
                parts[2].trim()
            ))
        }
    };
    let ws = clean_guest_path(workspace);
    let guest = if parts[1].starts_with('/') {
        clean_guest_path(parts[1])
    } else {
        clean_guest_path(&format!("{ws}/{}", parts[1]))
    };
    if !guest.starts_with('/') || !matchlock_api::guest_path_within(&guest, &ws) {
        return Err(format!(
            "guest path must be within workspace: {guest:?} not in {ws:?}"
        ));
    }
    let mount = MountConfig {
        kind: kind.to_string(),
        host_path,
        readonly,
        ..MountConfig::default()
    };
    Ok((guest, mount))
}

/// The `vfs` section for `--workspace` and `-v` (run flow step 8), or none.
fn vfs_for(a: &RunArgs) -> anyhow::Result<Option<VfsConfig>> {
    if a.workspace.is_none() && a.volume.is_empty() {
        return Ok(None);
    }
    let ws = a.workspace.as_deref().unwrap_or("").trim();
    if !a.volume.is_empty() && ws.is_empty() {
        anyhow::bail!("--workspace is required when using --volume");
    }
    let mut vfs = VfsConfig {
        workspace: if ws.is_empty() {
            String::new()
        } else {
            clean_guest_path(ws)
        },
        ..VfsConfig::default()
    };
    for spec in &a.volume {
        let (guest, mount) = parse_volume(spec, &vfs.workspace)
            .map_err(|e| anyhow::anyhow!("invalid volume mount {spec:?}: {e}"))?;
        vfs.mounts.insert(guest, mount);
    }
    Ok(Some(vfs))
}

/// Run flow step 9: an extra disk mounted inside the workspace would be hidden by it.
fn check_disks_outside_workspace(
    specs: &[String],
    disks: &[ExtraDisk],
    vfs: Option<&VfsConfig>,
) -> anyhow::Result<()> {
    let Some(vfs) = vfs.filter(|v| v.enabled()) else {
        return Ok(());
    };
    let ws = vfs.workspace();
    for (spec, d) in specs.iter().zip(disks) {
        if matchlock_api::guest_path_within(&d.guest_mount, ws) {
            anyhow::bail!(
                "invalid disk mount {spec:?}: guest mount {:?} is inside workspace {ws:?} and will be shadowed by the VFS mount",
                d.guest_mount
            );
        }
    }
    Ok(())
}

/// The image (local, cached or pulled) and its config with the flags' overrides.
fn image_for(a: &RunArgs) -> anyhow::Result<(matchlock_image::ImageRecord, ImageConfig)> {
    let paths = common::paths()?;
    let store = common::image_store(&paths).context("building rootfs")?;
    let resolved = super::pull::resolve(store, &a.image, a.pull).with_context(|| {
        format!(
            "building rootfs: image {:?} not found locally and pulling it failed (import one with `matchlock image import {} < image.tar`; `matchlock image ls` lists what is available)",
            a.image, a.image
        )
    })?;
    if !resolved.cached {
        eprintln!("Built rootfs for {} ({})", a.image, resolved.record.digest);
    }
    let overrides = ImageOverrides {
        user: a.user.clone(),
        working_dir: a.workdir.clone(),
        entrypoint: a.entrypoint.as_ref().map(|ep| {
            if ep.is_empty() {
                Vec::new()
            } else {
                vec![ep.clone()]
            }
        }),
        ..Default::default()
    };
    let image_config = resolved.record.config.with_overrides(&overrides);
    Ok((resolved.record, image_config))
}

/// The guest network settings the flags ask for.
fn network_for(a: &RunArgs) -> anyhow::Result<NetworkConfig> {
    let add_hosts = a
        .add_host
        .iter()
        .map(|s| matchlock_api::parse_add_host(s))
        .collect::<Result<Vec<_>, _>>()?;
    for d in &a.dns_servers {
        if d.trim().parse::<std::net::IpAddr>().is_err() {
            anyhow::bail!("invalid --dns-servers entry {d:?}: expected an IP address");
        }
    }
    let mut secrets = std::collections::BTreeMap::new();
    for spec in &a.secret {
        let parsed =
            matchlock_sandbox::network::parse_secret_spec(spec, &|n| std::env::var(n).ok())
                .map_err(|e| anyhow::anyhow!("invalid secret {spec:?}: {e}"))?;
        secrets.insert(
            parsed.name.clone(),
            matchlock_api::Secret {
                value: parsed.value.clone(),
                placeholder: String::new(),
                hosts: parsed.hosts.clone(),
            },
        );
    }
    let network = NetworkConfig {
        allowed_hosts: a
            .allow_host
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        add_hosts,
        block_private_ips: true,
        no_network: a.no_network,
        intercept: a.network_intercept,
        secrets,
        dns_servers: a.dns_servers.iter().map(|s| s.trim().to_string()).collect(),
        hostname: a.hostname.clone().unwrap_or_default(),
        mtu: u32::try_from(a.mtu).unwrap_or(matchlock_api::DEFAULT_MTU),
        ..Default::default()
    };
    network.validate()?;
    matchlock_sandbox::network::validate(&network)?;
    Ok(network)
}

fn plan(a: &RunArgs) -> anyhow::Result<Plan> {
    if a.mtu <= 0 {
        anyhow::bail!("--mtu must be > 0");
    }
    let resources = Resources {
        cpus: a.cpus,
        memory_mb: a.memory,
        disk_size_mb: a.disk_size,
        timeout_seconds: a.timeout.unwrap_or(matchlock_api::DEFAULT_TIMEOUT_SECONDS),
    };
    resources
        .validate_for_host()
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    refuse_unavailable(a)?;
    let network = network_for(a)?;
    let accel: matchlock_vm::Accel = a
        .accel
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --accel {:?} (use auto, kvm or tcg)", a.accel))?;
    let publish = a
        .publish
        .iter()
        .map(|p| forward::parse_port_spec(p))
        .collect::<Result<Vec<_>, _>>()?;
    let addresses = if publish.is_empty() {
        Vec::new()
    } else {
        forward::parse_addresses(&a.address)?
    };
    // Run flow step 8, before the image is looked up (as the network settings are).
    let vfs = vfs_for(a)?;
    let (image, image_config) = image_for(a)?;
    let mode = Mode::from_flags(a.tty, a.interactive);
    let argv = image_config.compose(&a.command);
    if a.rm && argv.is_empty() && mode != Mode::Tty {
        anyhow::bail!("command required (or use --rm=false to start without a command)");
    }
    let lookup = |k: &str| std::env::var(k).ok();
    let env = matchlock_api::env::collect_env(&a.env_file, &a.env, &lookup)
        .map_err(|e| anyhow::anyhow!("invalid environment variable: {e}"))?;
    let extra_disks = a
        .disk
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_disks_outside_workspace(&a.disk, &extra_disks, vfs.as_ref())?;
    if let Some(v) = &vfs {
        v.validate()?;
    }
    let config = Config {
        image: a.image.clone(),
        privileged: a.privileged,
        resources,
        network: Some(network),
        vfs,
        env,
        extra_disks,
        image_config: Some(image_config.clone()),
        ..Default::default()
    };
    Ok(Plan {
        config,
        argv,
        image,
        image_config,
        mode,
        accel,
        publish,
        addresses,
    })
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.detach && (a.tty || a.interactive) {
        anyhow::bail!("--detach cannot be combined with -t/--tty or -i/--interactive");
    }
    if a.detach {
        return detach();
    }
    let plan = plan(&a)?;
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let (accel, warning) = common::resolve_accel(plan.accel);
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let rt = common::runtime()?;
    let code = rt.block_on(own(&a, plan, paths, state, accel))?;
    rt.shutdown_timeout(Duration::from_millis(100));
    if code == 0 {
        Ok(())
    } else {
        Err(ExitWith(code).into())
    }
}

/// Boots the sandbox, runs the command (and/or keeps the sandbox until told to stop), then
/// closes it; returns the exit code.
async fn own(
    a: &RunArgs,
    plan: Plan,
    paths: Paths,
    state: Arc<StateDb>,
    accel: matchlock_vm::Accel,
) -> anyhow::Result<i32> {
    // Installed before booting, so a signal during boot stops the sandbox cleanly.
    let signals = ShutdownSignals::install(Hangup::Ignore)?;
    let mut config = plan.config.clone();
    let mut services = Services::for_config(&mut config, None)?;
    services.add_filesystem(config.vfs.as_ref())?;
    let opts = StartOptions {
        spec: SandboxSpec {
            config,
            rootfs: plan.image.rootfs.clone(),
            image_config: plan.image_config.clone(),
            accel,
            owner_pid: std::process::id(),
            services,
            no_snapshot: a.no_snapshot,
        },
        lifetime: a.timeout.map(Duration::from_secs),
        remove_on_failure: a.rm,
    };
    let sandbox = match RunningSandbox::start(&paths, state, opts, &signals.token()).await {
        Ok(sb) => sb,
        Err(StartError::Aborted) => return Ok(signals.exit_code().unwrap_or(130)),
        Err(e) => return Err(e.into()),
    };
    let outcome = serve(a, &plan, &sandbox, &signals).await;
    sandbox
        .close(a.graceful_shutdown, "run ended")
        .await
        .context("cleanup task")?;
    if a.rm {
        if let Err(e) = sandbox.remove() {
            eprintln!("remove sandbox {}: {e}", sandbox.id());
        }
    }
    outcome
}

/// Everything between boot and close: port forwards, the command, and (with `--rm=false`)
/// waiting until the sandbox should stop.
async fn serve(
    a: &RunArgs,
    plan: &Plan,
    sandbox: &Arc<RunningSandbox>,
    signals: &ShutdownSignals,
) -> anyhow::Result<i32> {
    if !plan.publish.is_empty() {
        let on_error: forward::OnError =
            Arc::new(|m| eprintln!("port-forward connection error: {m}"));
        let bindings = sandbox
            .forward(&plan.addresses, &plan.publish, on_error)
            .await
            .context("start port-forward listener")?;
        super::port_forward::announce(&bindings);
    }
    if !a.rm {
        eprintln!("Sandbox {} is running", sandbox.id());
        eprintln!("  Connect: matchlock exec {} -it sh", sandbox.id());
        eprintln!("  Stop:    matchlock kill {}", sandbox.id());
    }
    let (code, stop_now) = if !plan.argv.is_empty() || plan.mode == Mode::Tty {
        run_command(a, plan, sandbox).await
    } else {
        (0, false)
    };
    if !a.rm && !stop_now {
        // Keep the sandbox until we are told to stop (kill, Ctrl-C), it expires or the VM dies.
        if let StopReason::VmExited(why) = sandbox.wait_for_stop(&signals.token()).await {
            eprintln!("sandbox {}: VM exited ({why})", sandbox.id());
        }
    }
    Ok(code)
}

/// Runs the command with local stdio; returns its exit code and whether the sandbox must
/// stop now (interrupted, timed out, or our stdout closed).
async fn run_command(a: &RunArgs, plan: &Plan, sandbox: &Arc<RunningSandbox>) -> (i32, bool) {
    let mut argv = plan.argv.clone();
    if argv.is_empty() {
        argv.push("sh".into());
    }
    let req = ExecRequest {
        argv,
        ..Default::default()
    };
    // Command output is also kept in the sandbox's (capped) console log, except on a TTY.
    let log = if plan.mode == Mode::Tty {
        None
    } else {
        sandbox.console_writer()
    };
    let deadline = CancellationToken::new();
    let expiry = {
        let (d, sb) = (deadline.clone(), sandbox.clone());
        tokio::spawn(async move {
            sb.expired().await;
            d.cancel();
        })
    };
    let end = drive(Target::Owned(sandbox), req, plan.mode, log, deadline).await;
    expiry.abort();
    match end {
        Ok(SessionEnd::Exited(st)) => (st.code, false),
        Ok(SessionEnd::Interrupted(124)) => {
            eprintln!(
                "executing command: timed out after {}s",
                a.timeout.unwrap_or(0)
            );
            (1, true)
        }
        Ok(SessionEnd::Interrupted(c)) => (c, true),
        // A closed stdout (`| head`) ends the command quietly, like any Unix filter.
        Err(e) if crate::is_broken_pipe(&e) => (0, true),
        Err(e) => {
            eprintln!("{e:#}");
            (1, false)
        }
    }
}

/// `-d`: re-run ourselves in the background with `--detach=false --rm=false`, wait until
/// that sandbox is ready for `exec`, print its ID.
fn detach() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("find own executable")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let pos = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.insert(pos, "--rm=false".into());
    args.insert(pos, "--detach=false".into());
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    matchlock_state::StateDb::ensure_private_dir(&paths.state).context("create state directory")?;
    let errlog_path = paths
        .state
        .join(format!("detach-{}.log", std::process::id()));
    let errlog = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&errlog_path)
        .context("create detach log")?;
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .env("MATCHLOCK_QUIET_ACCEL", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(errlog)
        .process_group(0)
        .spawn()
        .context("start detached sandbox")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(180);
    let result = loop {
        if let Some(st) = child.try_wait().context("wait for detached sandbox")? {
            let msg = std::fs::read_to_string(&errlog_path).unwrap_or_default();
            break Err(anyhow::anyhow!(
                "find detached VM for detached process pid={pid}: it exited ({st}){}{}",
                if msg.trim().is_empty() { "" } else { ":\n" },
                msg.trim_end()
            ));
        }
        let found = state.list().ok().and_then(|l| {
            l.into_iter()
                .find(|r| r.pid == pid && r.status == matchlock_state::VmStatus::Running)
        });
        if let Some(rec) = found {
            if state
                .vm_dir(&rec.id)
                .join(matchlock_sandbox::relay::SOCKET_NAME)
                .exists()
            {
                break Ok(rec.id);
            }
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "detached sandbox (pid {pid}) did not become ready in 180s"
            ));
        }
        // Readiness is seen one poll late at worst: 50 ms cost ~14 ms (median) of a
        // restored `run -d` (`matchlock-bench snapshot`); a state-DB read is well under 1 ms.
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&errlog_path);
    println!("{}", result?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--secret NAME=VALUE@h1,h2` stays one value with two hosts through clap (no value
    /// delimiter, unlike `--allow-host a,b`, which splits), reference §15 #34.
    #[test]
    fn secret_with_several_hosts_is_one_value() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "run",
            "--image",
            "x",
            "--secret",
            "KEY=v,with,commas@api.test, other.test",
            "--secret",
            "ENV_ONLY@web.test",
            "--allow-host",
            "a.test,b.test",
        ])
        .expect("parses");
        assert_eq!(
            cli.run.secret,
            [
                "KEY=v,with,commas@api.test, other.test",
                "ENV_ONLY@web.test"
            ]
        );
        assert_eq!(cli.run.allow_host, ["a.test", "b.test"]);
        let spec = matchlock_sandbox::network::parse_secret_spec(&cli.run.secret[0], &|_| None)
            .expect("spec");
        assert_eq!(spec.name, "KEY");
        assert_eq!(spec.value, "v,with,commas");
        assert_eq!(spec.hosts, ["api.test", "other.test"]);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms").expect("ms"),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("5s").expect("s"), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").expect("m"), Duration::from_secs(120));
        assert_eq!(parse_duration("3").expect("bare"), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn disks() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("d.ext4");
        std::fs::write(&f, b"").expect("w");
        let d = parse_disk(&format!("{}:/data:ro", f.display())).expect("ok");
        assert!(d.readonly);
        assert_eq!(d.guest_mount, "/data");
        assert!(parse_disk("/nonexistent/x:/data")
            .expect_err("missing")
            .to_string()
            .contains("host path does not exist"));
        assert!(parse_disk(&format!("{}:/da ta", f.display())).is_err());
        assert!(parse_disk(&format!("{}:/data:rw2", f.display()))
            .expect_err("opt")
            .to_string()
            .contains("unknown disk option"));
        assert!(parse_disk("onlyone").is_err());
    }

    #[test]
    fn volumes() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().to_str().expect("utf8");
        let (g, m) = parse_volume(&format!("{d}:sub/x"), "/workspace").expect("relative");
        assert_eq!(g, "/workspace/sub/x");
        assert_eq!((m.kind.as_str(), m.readonly), ("overlay", false));
        assert_eq!(m.host_path, d);
        let (_, m) = parse_volume(&format!("{d}:/workspace:host_fs"), "/workspace").expect("fs");
        assert_eq!((m.kind.as_str(), m.readonly), ("host_fs", false));
        let (_, m) = parse_volume(&format!("{d}:/workspace/a: RO "), "/workspace/").expect("ro");
        assert_eq!((m.kind.as_str(), m.readonly), ("host_fs", true));
        let (g, _) = parse_volume(&format!("{d}:/anything/x"), "/").expect("root workspace");
        assert_eq!(g, "/anything/x");
        let err = |spec: String| parse_volume(&spec, "/workspace").expect_err("invalid");
        assert!(err(format!("{d}:/workspace-cache")).contains("must be within workspace"));
        assert!(err(format!("{d}:/workspace/../etc")).contains("must be within workspace"));
        assert!(err(format!("{d}:../../etc")).contains("must be within workspace"));
        assert!(err(format!("{d}:/w:x")).contains("use 'ro', 'overlay', or 'host_fs'"));
        assert!(err(format!("{d}/nope:/workspace")).contains("host path does not exist"));
        assert!(err(d.to_string()).contains("expected format"));
        assert!(err(format!("{d}:a:ro:x")).contains("expected format"));
        assert_eq!(clean_guest_path("/a/./b//c/../d/"), "/a/b/d");
        assert_eq!(clean_guest_path("/../x"), "/x");
    }
}
