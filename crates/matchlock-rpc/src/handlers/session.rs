//! `create`, `close`, `cancel` and the sandbox lifetime.

use std::sync::Arc;
use std::time::Duration;

use matchlock_api::rpc::{
    envelope, to_value, CancelParams, CancelResult, CloseParams, CreateResult, Empty, EventParams,
    Notice,
};
use matchlock_api::{ImageConfig, ImageOverrides};
use matchlock_sandbox::services::{EventSink, SandboxEvent, Services};
use matchlock_sandbox::{RunningSandbox, SandboxSpec, StartOptions};
use serde_json::Value;

use super::params;
use crate::config::{self, CreatePlan};
use crate::error::Failure;
use crate::shared::Shared;

/// How long `create` waits to see whether a launched entrypoint fails right away.
const ENTRYPOINT_WINDOW: Duration = Duration::from_millis(500);

pub async fn create(s: &Arc<Shared>, p: Value) -> Result<Value, Failure> {
    let plan = config::plan(p)?;
    if let Ok(cur) = s.current() {
        return Err(Failure::VmExists(cur.id().to_string()));
    }
    if let Some(net) = &plan.config.network {
        matchlock_sandbox::network::validate(net).map_err(Failure::Network)?;
    }
    plan.config
        .resources
        .validate_for_host()
        .map_err(Failure::Resources)?;
    let record = resolve_image(s, &plan.config.image).await?;
    let overrides = plan
        .config
        .image_config
        .as_ref()
        .map(ImageOverrides::from_request)
        .unwrap_or_default();
    let image_config = record.config.with_overrides(&overrides);
    let sandbox = start(s, &plan, record.rootfs, image_config.clone()).await?;
    if plan.config.launch_entrypoint {
        let argv = image_config.compose(&[]);
        if !argv.is_empty() {
            if let Err(f) = launch_entrypoint(&sandbox, argv).await {
                let _ = sandbox
                    .close(Duration::ZERO, "entrypoint failed to start")
                    .await;
                let _ = s.state.remove(sandbox.id());
                return Err(f);
            }
        }
    }
    s.set_session(sandbox.clone());
    watch_lifetime(s, &sandbox);
    tracing::info!(id = %sandbox.id(), "sandbox created");
    Ok(to_value(&CreateResult {
        id: sandbox.id().to_string(),
    }))
}

/// `e` and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// The image as `run` finds it (spec §6.1): a local tag, an earlier pull of the same
/// reference, else a pull from its registry (quietly: stdout is the RPC stream).
async fn resolve_image(s: &Shared, tag: &str) -> Result<matchlock_image::ImageRecord, Failure> {
    let root = s.opts.paths.images();
    let tag = tag.to_string();
    tokio::task::spawn_blocking(move || {
        let store = matchlock_image::ImageStore::open(&root).map_err(Failure::ImageStore)?;
        let opts = matchlock_image::PullOptions::from_env();
        match store.resolve(&tag, &opts) {
            Ok(r) => Ok(r.record),
            Err(e) => Err(Failure::ImagePull {
                tag,
                source: Box::new(e),
            }),
        }
    })
    .await
    .map_err(Failure::ImageJoin)?
}

async fn start(
    s: &Shared,
    plan: &CreatePlan,
    rootfs: std::path::PathBuf,
    image_config: ImageConfig,
) -> Result<Arc<RunningSandbox>, Failure> {
    let mut config = plan.config.clone();
    config.image_config = Some(image_config.clone());
    let mut services =
        Services::for_config(&mut config, Some(event_sink(s))).map_err(Failure::Network)?;
    services
        .add_filesystem(config.vfs.as_ref())
        .map_err(|e| Failure::Vfs(chain(&e)))?;
    let spec = SandboxSpec {
        config,
        rootfs,
        image_config,
        accel: s.opts.accel,
        owner_pid: s.opts.owner_pid,
        services,
        // RPC `create` has no such field; MATCHLOCK_NO_SNAPSHOT=1 opts out.
        no_snapshot: false,
    };
    let opts = StartOptions {
        spec,
        lifetime: plan.lifetime_secs.map(Duration::from_secs),
        remove_on_failure: false,
    };
    RunningSandbox::start(&s.opts.paths, s.state.clone(), opts, &s.run)
        .await
        .map_err(Failure::Create)
}

/// Events queued for the client before new ones are dropped (as the reference's 100).
const EVENT_QUEUE: usize = 100;

/// The sandbox's network events as `event` notifications. The sink never waits: events
/// beyond [`EVENT_QUEUE`] waiting for a slow client are dropped (and counted in the log).
fn event_sink(s: &Shared) -> EventSink {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<EventParams>(EVENT_QUEUE);
    let data = s.data_sender();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let line = envelope::notification(Notice::Event, to_value(&ev));
            if data.send(line.into()).await.is_err() {
                return;
            }
        }
    });
    let dropped = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |ev: &SandboxEvent| {
        let Some(params) = ev.event_params() else {
            return;
        };
        if tx.try_send(params).is_err() {
            let n = dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tracing::debug!(dropped = n, "event notification dropped: client too slow");
        }
    })
}

/// Starts the image's entrypoint in the background (output to the VM log, spec §2.5);
/// fails if it fails within [`ENTRYPOINT_WINDOW`].
async fn launch_entrypoint(sandbox: &RunningSandbox, argv: Vec<String>) -> Result<(), Failure> {
    let mut task = sandbox.spawn_background(argv);
    tokio::select! {
        r = &mut task => match r {
            Ok(Ok(st)) if st.code == 0 => Ok(()),
            Ok(Ok(st)) => Err(Failure::EntrypointExit(st.code)),
            Ok(Err(e)) => Err(Failure::Entrypoint(e)),
            Err(e) => Err(Failure::EntrypointJoin(e)),
        },
        () = tokio::time::sleep(ENTRYPOINT_WINDOW) => Ok(()),
    }
}

/// Enforces `resources.timeout_seconds`: when the sandbox's lifetime passes, in-flight
/// requests are cancelled, the sandbox is closed and later requests are told why.
fn watch_lifetime(s: &Arc<Shared>, sandbox: &Arc<RunningSandbox>) {
    // Without a lifetime the watcher would wait forever holding the sandbox.
    if sandbox.lifetime().is_none() {
        return;
    }
    let weak = Arc::downgrade(s);
    let sandbox = sandbox.clone();
    tokio::spawn(async move {
        let secs = sandbox.expired().await.as_secs();
        let Some(s) = weak.upgrade() else { return };
        let why = format!(
            "sandbox {} was stopped: resources.timeout_seconds ({secs}s) expired",
            sandbox.id()
        );
        // Only if it is still this session's sandbox (not closed or replaced meanwhile).
        let current = s.current().ok();
        if !current.is_some_and(|c| Arc::ptr_eq(&c, &sandbox)) {
            return;
        }
        let Some(cur) = s.take_session(Some(why.clone())) else {
            return;
        };
        tracing::warn!("{why}");
        s.cancel_all();
        if let Err(e) = cur.close(Duration::ZERO, "lifetime expired").await {
            tracing::warn!(error = %e, "closing the expired sandbox failed");
        }
    });
}

pub async fn close(s: &Arc<Shared>, p: Value) -> Result<Value, Failure> {
    let p: CloseParams = params(p)?;
    let Some(sandbox) = s.take_session(Some("sandbox closed".into())) else {
        return Ok(to_value(&Empty {}));
    };
    let grace = Duration::try_from_secs_f64(p.timeout_seconds).unwrap_or(Duration::ZERO);
    sandbox
        .close(grace, "closed by the client")
        .await
        .map_err(Failure::CloseJoin)?;
    Ok(to_value(&Empty {}))
}

pub fn cancel(s: &Shared, p: Value) -> Result<Value, Failure> {
    let p: CancelParams = params(p)?;
    Ok(to_value(&CancelResult {
        cancelled: !p.id.is_null() && s.cancel(&p.id),
    }))
}
