//! The cold-start breakdown (issue 11 item 2): one in-process boot per run, split into the
//! phases [`matchlock_sandbox::phases::BootPhases`] measures, plus the first exec and the
//! close.
//!
//! # Design
//! The same library call `matchlock run` makes (`RunningSandbox::start`), in this process,
//! so the phase marks are available; the CLI's own process start and state-file work are
//! what remains between the sum here and the `matchlock run -- true` row. Each phase is a
//! median of its own, so the medians need not add up exactly to the median total.
//!
//! # Limitations
//! Guest phases come from the guest's clock (see `phases.rs`); a guest runtime that sends no
//! times prints "n/a".

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use matchlock_sandbox::phases::BootPhases;
use matchlock_sandbox::services::Services;
use matchlock_sandbox::SandboxSpec;

use crate::{exec_true, median, ms, Bench, IMAGE};

/// Picks one phase out of a sample (`None`: not measured).
type Phase = dyn Fn(&Sample) -> Option<Duration>;

/// One in-process cold start.
pub struct Sample {
    pub(crate) phases: BootPhases,
    pub(crate) first_exec: Duration,
    close: Duration,
    total: Duration,
    /// The VM's console log (read before the sandbox is removed).
    pub(crate) console: String,
}

impl Bench {
    /// The benchmark sandbox: the cached bench image, a 256 MiB upper disk.
    pub(crate) fn spec(&self) -> anyhow::Result<SandboxSpec> {
        let store = matchlock_image::ImageStore::open(&self.paths().images())?;
        let image = store.get(IMAGE)?.context("bench image missing")?;
        Ok(SandboxSpec {
            config: matchlock_api::Config {
                image: IMAGE.into(),
                resources: matchlock_api::Resources {
                    disk_size_mb: 256,
                    ..Default::default()
                },
                ..Default::default()
            },
            rootfs: image.rootfs.clone(),
            image_config: matchlock_api::ImageConfig::default(),
            accel: matchlock_vm::detect_accel(matchlock_vm::Accel::Auto).accel,
            owner_pid: std::process::id(),
            services: Services::default(),
            // The cold-start breakdown measures cold boots.
            no_snapshot: true,
        })
    }

    /// Boots a sandbox in-process, runs `true` once, closes it; times each step.
    pub(crate) fn cold_in_process(&self) -> anyhow::Result<Sample> {
        let mut spec = self.spec()?;
        // The CLI's default disk size, as `matchlock run` would create it.
        spec.config.resources.disk_size_mb = matchlock_api::Resources::default().disk_size_mb;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let t = Instant::now();
            let sb = self.start_in_process(spec).await?;
            let (req, io) = exec_true();
            let e = Instant::now();
            let st = sb.exec(req, io).await?;
            let first_exec = e.elapsed();
            if st.code != 0 {
                bail!("first exec true exited {}", st.code);
            }
            let c = Instant::now();
            sb.close(Duration::from_secs(2), "benchmark done").await?;
            let close = c.elapsed();
            let total = t.elapsed();
            let console = std::fs::read_to_string(sb.console_log()).unwrap_or_default();
            let _ = sb.remove();
            Ok(Sample {
                phases: sb.boot_phases(),
                first_exec,
                close,
                total,
                console,
            })
        })
    }
}

/// Prints the medians of each phase next to the bare boot and CLI rows.
pub fn print(samples: &[Sample], bare: Duration, cli: Duration) {
    let med = |f: &Phase| -> String {
        let v: Vec<Duration> = samples.iter().filter_map(f).collect();
        if v.len() < samples.len() {
            return "n/a".into();
        }
        ms(median(v))
    };
    println!(
        "cold start breakdown (in-process RunningSandbox::start, default disk size, {} runs, medians):",
        samples.len()
    );
    let rows: [(&str, &Phase); 8] = [
        ("host preparation (assets, upper disk, sockets)", &|s| {
            Some(s.phases.host_prep)
        }),
        (
            "QEMU to kernel (incl. spawning QEMU + vsock helper)",
            &|s| s.phases.qemu_to_kernel,
        ),
        ("  of which spawning QEMU + vsock helper", &|s| {
            Some(s.phases.vm_spawn)
        }),
        ("kernel to /init (guest clock)", &|s| {
            s.phases.kernel_to_init
        }),
        ("/init to Ready (root, agent, handshake)", &|s| {
            s.phases.init_to_ready
        }),
        ("first exec (true)", &|s| Some(s.first_exec)),
        ("close (guest power-off, teardown)", &|s| Some(s.close)),
        ("total (start + first exec + close)", &|s| Some(s.total)),
    ];
    for (name, f) in rows {
        println!("  {name:<52} {}", med(f));
    }
    let total = median(samples.iter().map(|s| s.total).collect());
    println!(
        "  in-process total / bare boot: {:.2}; CLI run -- true / bare boot: {:.2} (target <= 1.15)",
        total.as_secs_f64() / bare.as_secs_f64(),
        cli.as_secs_f64() / bare.as_secs_f64()
    );
}
