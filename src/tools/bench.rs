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
use crate::io::registry::{EmbeddedRegistry, HttpRegistry};
use crate::io::sink::{ensure_topics, producer_config, TopicSpec};
use crate::serve::http::Health;
use crate::tools::gen::{partition_for, skewed_partition, GenOptions, Generator, Publisher};

/// What to preload and how to run the pipeline over it.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events to preload and process.
    pub events: u64,
    /// Partitions of the preloaded topic.
    pub partitions: i32,
    /// Share of sessions on partition 0 (a hot partition); `None` spreads them evenly.
    pub hot_share: Option<f64>,
    /// Watermark alignment's `max_partition_drift`; `None` keeps the topology's.
    pub max_partition_drift: Option<Duration>,
    /// Which operators run.
    pub operators: Operators,
    /// The delivery guarantee.
    pub guarantee: crate::config::Guarantee,
    /// Instances in the consumer group, each with its own state directory, in this process.
    pub instances: usize,
}

/// The operators a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Operators {
    /// The QoS windows alone (no session lifecycle, no DAU).
    Qos,
    /// The whole QoE and engagement picture: QoS windows with the session lifecycle
    /// (attempts, failures, exits, startup percentiles, bitrate) and early results, and DAU.
    Qoe,
    /// Every operator: `qoe` and the resume table behind its repartition topic.
    All,
}

/// What one benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub events: u64,
    /// Times watermark alignment paused a partition.
    pub pauses: u64,
    /// Seeks after a broker skipped past a partition's position.
    pub seeks: u64,
    pub preload_secs: f64,
    pub wall_secs: f64,
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
    /// Changelog records read back into an empty state directory, and how long it took.
    pub restored: u64,
    pub restore_secs: f64,
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
        writeln!(f, "peak RSS (pipeline phase) {:.0} MiB", self.peak_rss_mib)?;
        writeln!(
            f,
            "alignment                 {} pause(s), {} seek(s) back",
            self.pauses, self.seeks
        )?;
        write!(
            f,
            "restore                   {} changelog records in {:.2}s ({:.0} records/s)",
            self.restored,
            self.restore_secs,
            self.restored as f64 / self.restore_secs.max(1e-9)
        )
    }
}

/// A pipeline that handles no record for this long has stalled: the benchmark fails.
const STALL: Duration = Duration::from_secs(60);

/// Preloads generated events into a fresh topic on `brokers`, then measures the pipeline
/// consuming them; fails if it does not handle every one.
pub fn run(brokers: &str, options: &BenchOptions) -> Result<BenchReport, PipelineError> {
    let BenchOptions {
        events, partitions, ..
    } = *options;
    let registry = EmbeddedRegistry::start()
        .map_err(|e| PipelineError::Other(format!("embedded registry: {e}")))?;
    let topic = format!(
        "bench-events-{}-{}",
        std::process::id(),
        crate::runtime::wall_clock_ms()
    );
    let state = tempdir_path("marquee-bench");
    let mut topology = Topology::parse(
        include_str!("../../topologies/qos.toml"),
        Path::new("topologies/qos.toml"),
    )?;
    topology.source.topic = topic.clone();
    topology.source.group_id = Some(format!("{topic}-group"));
    topology.sink.topic = format!("{topic}-qos");
    topology.sink.late_topic = format!("{topic}-late");
    topology.sink.dead_letter_topic = format!("{topic}-dead");
    topology.state.dir = state.clone();
    topology.time.idle_timeout = Duration::from_secs(2);
    let qos = topology
        .qos
        .as_mut()
        .expect("topologies/qos.toml has [qos]");
    match options.operators {
        Operators::Qos => {
            qos.qoe = false;
            topology.dau = None;
        }
        Operators::Qoe | Operators::All => {
            qos.qoe = true;
            qos.emit = crate::config::EmitPolicy::Early;
            if let Some(dau) = topology.dau.as_mut() {
                dau.topic = format!("{topic}-dau");
            }
        }
    }
    if options.operators == Operators::All {
        let mut resume = Topology::parse(
            include_str!("../../topologies/resume.toml"),
            Path::new("topologies/resume.toml"),
        )?
        .resume
        .expect("topologies/resume.toml has [resume]");
        resume.topic = format!("{topic}-resume");
        topology.resume = Some(resume);
    }
    topology.processing.guarantee = options.guarantee;
    if let Some(drift) = options.max_partition_drift {
        topology.time.max_partition_drift = drift;
    }

    let input = TopicSpec {
        name: &topic,
        partitions: Some(partitions),
        replication_factor: None,
        configs: &[],
    };
    ensure_topics(&producer_config(brokers, &Default::default()), &[input])?;
    let started = Instant::now();
    {
        let http_registry = HttpRegistry::new(&registry.url())?;
        let publisher = Publisher::new(brokers, &http_registry, &topic, Some(partitions))?;
        let gen = GenOptions {
            session_interval_ms: 20,
            late_share: 0.001,
            ..GenOptions::default()
        };
        for arrival in Generator::new(gen).take(events as usize) {
            let partition = match options.hot_share {
                Some(share) => skewed_partition(&arrival.event.session_id, partitions, share),
                None => partition_for(&arrival.event.session_id, partitions),
            };
            publisher.send_to(&arrival.event, Some(partition))?;
        }
        publisher.flush()?;
    }
    let preload_secs = started.elapsed().as_secs_f64();
    eprintln!("preloaded {events} events in {preload_secs:.1}s; running the pipeline");

    reset_peak_rss();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let endpoints = Endpoints {
        brokers: brokers.to_string(),
        registry: registry.url(),
        http: None,
        instance_id: None,
    };
    let mut healths = Vec::new();
    let mut pipelines = Vec::new();
    for i in 0..options.instances.max(1) {
        let health = Arc::new(Health::default());
        let (shutdown, endpoints) = (shutdown.clone(), endpoints.clone());
        let mut topology = topology.clone();
        topology.state.dir = state.join(format!("instance-{i}"));
        healths.push(Arc::clone(&health));
        pipelines.push(std::thread::spawn(move || {
            app::run(&topology, &endpoints, &shutdown, health, None)
        }));
    }
    let processed = || healths.iter().map(|h| h.processed()).sum::<u64>();
    // With the resume table every event is read twice: from the input and, re-keyed by
    // profile, from the repartition topic.
    let reads = if options.operators == Operators::All {
        2 * events
    } else {
        events
    };
    let mut progress = (0, Instant::now());
    while processed() < reads {
        if pipelines.iter().any(|p| p.is_finished()) {
            break;
        }
        let processed = processed();
        if processed != progress.0 {
            progress = (processed, Instant::now());
        } else if progress.1.elapsed() > STALL {
            shutdown.cancel();
            return Err(PipelineError::Other(format!(
                "the pipeline handled {processed} of {reads} records and then nothing for {STALL:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_secs = cpu_seconds() - cpu_before;
    let peak_rss_mib = peak_rss_kib() as f64 / 1024.0;
    shutdown.cancel();
    let outcome = pipelines
        .into_iter()
        .map(|p| {
            p.join()
                .unwrap_or_else(|_| Err(PipelineError::Other("pipeline panicked".into())))
        })
        .fold(Ok(()), Result::and);
    let _ = std::fs::remove_dir_all(&state);
    outcome?;
    // Every partition rebuilt from the changelogs into an empty directory: a new instance.
    let (restored, restore_secs) = match app::input_changelog(&topology, &endpoints) {
        Some(changelog) => {
            let dir = tempdir_path("marquee-bench-restore");
            let store = crate::state::Store::open(&dir, 64, 64)?;
            let started = Instant::now();
            let all: Vec<i32> = (0..partitions).collect();
            let restored = changelog.restore(&store, app::INPUT_TASK, &all, |_| {})?;
            let took = started.elapsed().as_secs_f64();
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
            (restored, took)
        }
        None => (0, 0.0),
    };
    let page = crate::metrics::install().render();
    let label = format!("topic=\"{topic}\"");
    Ok(BenchReport {
        events: processed().min(reads) * events / reads,
        pauses: metric_sum(&page, "marquee_partition_pauses_total", &label),
        seeks: metric_sum(&page, "marquee_partition_seeks_total", &label),
        preload_secs,
        wall_secs,
        cpu_secs,
        peak_rss_mib,
        restored,
        restore_secs,
    })
}

/// Sum of the samples of counter `name` with `label` in a Prometheus text page.
fn metric_sum(page: &str, name: &str, label: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn tempdir_path(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        crate::runtime::wall_clock_ms()
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

/// What the query benchmark measured.
#[derive(Debug, Clone)]
pub struct QueryReport {
    pub requests: usize,
    pub concurrency: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub updates_per_cpu_second: f64,
}

impl std::fmt::Display for QueryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "table updates             {:.0} per CPU-second (apply + RocksDB write)",
            self.updates_per_cpu_second
        )?;
        writeln!(
            f,
            "queries                   {} from {} concurrent clients",
            self.requests, self.concurrency
        )?;
        writeln!(
            f,
            "query throughput          {:.0} requests/s",
            self.per_second
        )?;
        write!(
            f,
            "query latency             p50 {:.3} ms, p99 {:.3} ms",
            self.p50_ms, self.p99_ms
        )
    }
}

/// Fills a resume table with generated events, then measures continue-watching queries over
/// HTTP from `concurrency` clients. No broker needed.
pub fn queries(
    events: usize,
    requests: usize,
    concurrency: usize,
) -> Result<QueryReport, PipelineError> {
    use crate::state::{Store, StoredEntry};
    use crate::table::{apply, key_of, Applied};
    let dir = tempdir_path("marquee-query-bench");
    let store = Arc::new(Store::open(&dir, 64, 64)?);
    let partitions = 4;
    let mut profiles = std::collections::BTreeSet::new();
    let options = GenOptions {
        accounts: 20_000,
        ..GenOptions::default()
    };
    let generated: Vec<_> = Generator::new(options)
        .take(events)
        .map(|a| a.event)
        .collect();
    let cpu_before = cpu_seconds();
    // As in the table operator: entries changed since the last checkpoint, written once each.
    let mut dirty: std::collections::HashMap<String, (i32, crate::table::Entry)> =
        std::collections::HashMap::new();
    let checkpoint = |dirty: &mut std::collections::HashMap<_, (i32, crate::table::Entry)>| {
        let mut batch = crate::state::Batch::default();
        for (_, (p, entry)) in dirty.drain() {
            let stored = StoredEntry {
                entry,
                pending: false,
            };
            store.stage_table_put(&mut batch, p, &stored)?;
        }
        store.commit(batch)
    };
    for e in &generated {
        let key = key_of(e);
        let p = crate::tools::gen::partition_for(&e.profile_id, partitions);
        let current = match dirty.get(&key) {
            Some((_, entry)) => Some(entry.clone()),
            None => store
                .table_get(p, &e.profile_id, &e.title_id)?
                .map(|s| s.entry),
        };
        if let Applied::Updated(entry) = apply(current.as_ref(), e, 0.95) {
            dirty.insert(key, (p, entry));
        }
        profiles.insert(e.profile_id.clone());
        if dirty.len() >= 10_000 {
            checkpoint(&mut dirty)?;
        }
    }
    checkpoint(&mut dirty)?;
    let updates_per_cpu_second = events as f64 / (cpu_seconds() - cpu_before);

    let view = Arc::new(crate::resume::TableView::new(
        Arc::clone(&store),
        partitions,
    ));
    for p in 0..partitions {
        view.set_owned_for_bench(p);
    }
    let server = crate::serve::http::start(
        "127.0.0.1:0".parse().expect("literal address"),
        crate::metrics::install(),
        Arc::new(Health::default()),
        Some(view),
    )
    .map_err(|e| PipelineError::Other(format!("query benchmark server: {e}")))?;
    let addr = server.addr();
    let profiles: Vec<String> = profiles.into_iter().collect();
    let started = Instant::now();
    let per_client = requests / concurrency.max(1);
    let mut latencies: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|c| {
                let profiles = &profiles;
                scope.spawn(move || {
                    (0..per_client)
                        .map(|i| {
                            let profile = &profiles[(c * 7919 + i * 104_729) % profiles.len()];
                            let t = Instant::now();
                            get(
                                addr,
                                &format!("/profiles/{profile}/continue-watching?limit=20"),
                            );
                            t.elapsed().as_secs_f64() * 1000.0
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(QueryReport {
        requests: latencies.len(),
        concurrency,
        per_second: latencies.len() as f64 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        updates_per_cpu_second,
    })
}

/// One HTTP/1.0 GET; the body is read and dropped.
fn get(addr: std::net::SocketAddr, path: &str) {
    use std::io::{Read, Write};
    if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
        let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n");
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
}
