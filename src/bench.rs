//! `marquee bench`: end-to-end throughput over a preloaded topic. Generates events into a new
//! topic, then runs the QoS pipeline (decode, watermarks, windows, RocksDB checkpoints, result
//! output) over the backlog and reports events per second, CPU seconds per million events and
//! peak memory of the pipeline phase.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::app::{self, Endpoints};
use crate::config::Topology;
use crate::error::PipelineError;
use crate::gen::{GenOptions, Generator, Publisher};
use crate::http::Health;
use crate::registry::{EmbeddedRegistry, HttpRegistry};
use crate::sink::{ensure_topics, producer_config};

/// What one benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub events: u64,
    pub preload_secs: f64,
    pub wall_secs: f64,
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events                    {}", self.events)?;
        writeln!(f, "preload                   {:.1}s", self.preload_secs)?;
        writeln!(f, "pipeline wall time        {:.2}s", self.wall_secs)?;
        writeln!(
            f,
            "throughput                {:.0} events/s",
            self.events as f64 / self.wall_secs
        )?;
        writeln!(
            f,
            "CPU per million events    {:.2}s",
            self.cpu_secs * 1e6 / self.events as f64
        )?;
        writeln!(
            f,
            "events per CPU-second     {:.0}",
            self.events as f64 / self.cpu_secs
        )?;
        write!(f, "peak RSS (pipeline phase) {:.0} MiB", self.peak_rss_mib)
    }
}

/// Preloads `events` generated events into a fresh `partitions`-partition topic on `brokers`,
/// then measures the pipeline consuming them.
pub fn run(brokers: &str, events: u64, partitions: i32) -> Result<BenchReport, PipelineError> {
    let registry = EmbeddedRegistry::start()
        .map_err(|e| PipelineError::Other(format!("embedded registry: {e}")))?;
    let topic = format!(
        "bench-events-{}-{}",
        std::process::id(),
        crate::pipeline::wall_clock_ms()
    );
    let state = tempdir_path("marquee-bench");
    let mut topology = Topology::parse(
        include_str!("../topologies/qos.toml"),
        Path::new("topologies/qos.toml"),
    )?;
    topology.source.topic = topic.clone();
    topology.source.group_id = Some(format!("{topic}-group"));
    topology.sink.topic = format!("{topic}-qos");
    topology.sink.late_topic = format!("{topic}-late");
    topology.sink.dead_letter_topic = format!("{topic}-dead");
    topology.state.dir = state.clone();
    topology.time.idle_timeout = Duration::from_secs(2);

    ensure_topics(
        &producer_config(brokers, &Default::default()),
        &[&topic],
        partitions,
    );
    let started = Instant::now();
    {
        let http_registry = HttpRegistry::new(&registry.url())?;
        let publisher = Publisher::new(brokers, &http_registry, &topic, Some(partitions))?;
        let options = GenOptions {
            session_interval_ms: 20,
            late_share: 0.001,
            ..GenOptions::default()
        };
        for arrival in Generator::new(options).take(events as usize) {
            publisher.send(&arrival.event)?;
        }
        publisher.flush()?;
    }
    let preload_secs = started.elapsed().as_secs_f64();
    eprintln!("preloaded {events} events in {preload_secs:.1}s; running the pipeline");

    reset_peak_rss();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    let endpoints = Endpoints {
        brokers: brokers.to_string(),
        registry: registry.url(),
        http: None,
    };
    let pipeline = {
        let (health, shutdown) = (Arc::clone(&health), shutdown.clone());
        std::thread::spawn(move || app::run(&topology, &endpoints, &shutdown, health, None))
    };
    while health.processed() < events {
        if pipeline.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_secs = cpu_seconds() - cpu_before;
    let peak_rss_mib = peak_rss_kib() as f64 / 1024.0;
    shutdown.cancel();
    let outcome = pipeline
        .join()
        .unwrap_or_else(|_| Err(PipelineError::Other("pipeline panicked".into())));
    let _ = std::fs::remove_dir_all(&state);
    outcome?;
    Ok(BenchReport {
        events: health.processed(),
        preload_secs,
        wall_secs,
        cpu_secs,
        peak_rss_mib,
    })
}

fn tempdir_path(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        crate::pipeline::wall_clock_ms()
    ))
}

/// User plus system CPU time of this process.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resets the kernel's peak-RSS mark (VmHWM) so the preload phase does not count.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory (VmHWM) in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
