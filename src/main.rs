//! The `marquee` command: parses arguments, sets up logging and signals, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use marquee::app::{self, Endpoints};
use marquee::config::Topology;
use marquee::io::registry::HttpRegistry;
use marquee::serve::http::Health;
use marquee::tools::gen::{publish, GenOptions, Generator, Publisher};

/// Real-time QoS aggregates from video playback events.
#[derive(Parser)]
#[command(name = "marquee", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one instance of a topology against Kafka and a schema registry.
    Run {
        /// Topology file, e.g. topologies/qos.toml.
        topology: PathBuf,
        /// Kafka bootstrap servers.
        #[arg(long, env = "MARQUEE_BROKERS", default_value = "localhost:9092")]
        brokers: String,
        /// Schema registry URL.
        #[arg(
            long,
            env = "MARQUEE_REGISTRY",
            default_value = "http://localhost:8081"
        )]
        registry: String,
        /// Address serving /metrics, /healthz and /readyz.
        #[arg(long, env = "MARQUEE_HTTP", default_value = "0.0.0.0:9464")]
        http: SocketAddr,
        /// Override the topology's state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// This instance's stable name: static membership in its consumer groups (a restart
        /// within session.timeout.ms moves no partition) and its transactional ids. Without
        /// it, membership is dynamic and transactional ids use the host name and a hash of
        /// the state directory.
        #[arg(long, env = "MARQUEE_INSTANCE_ID")]
        instance_id: Option<String>,
    },
    /// Check a topology file without running it.
    Validate {
        /// Topology file.
        topology: PathBuf,
    },
    /// Generate synthetic playback events into a topic.
    Gen {
        /// Kafka bootstrap servers.
        #[arg(long, env = "MARQUEE_BROKERS", default_value = "localhost:9092")]
        brokers: String,
        /// Schema registry URL.
        #[arg(
            long,
            env = "MARQUEE_REGISTRY",
            default_value = "http://localhost:8081"
        )]
        registry: String,
        /// Topic to write.
        #[arg(long, default_value = "playback-events")]
        topic: String,
        /// Stop after this many events (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Events per second, with event times following the wall clock. Without it, events are
        /// sent as fast as possible with generated event times.
        #[arg(long)]
        rate: Option<u32>,
        /// Seed of the random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest arrival delay of an on-time event (e.g. 2s).
        #[arg(long, default_value = "2s", value_parser = marquee::config::parse_duration)]
        disorder: Duration,
        /// Share of events (0..1) that arrive late.
        #[arg(long, default_value_t = 0.0)]
        late_share: f64,
        /// Arrival delay of a late event.
        #[arg(long, default_value = "5m", value_parser = marquee::config::parse_duration)]
        late_delay: Duration,
    },
    /// Run the QoS job on an in-process Kafka and registry, printing windows as they close.
    Demo {
        /// Generated events per second.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Address serving /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9464")]
        http: SocketAddr,
    },
    /// Measure resume-table updates per CPU-second and query latency under concurrent clients.
    BenchQueries {
        /// Generated events applied to the table first.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Queries to send.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Measure end-to-end throughput over a preloaded topic on a real broker.
    Bench {
        /// Kafka bootstrap servers.
        #[arg(long, env = "MARQUEE_BROKERS")]
        brokers: String,
        /// Events to preload and process.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Partitions of the preloaded topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Put this share (0..1) of the sessions on partition 0: a hot partition that
        /// watermark alignment waits for while it pauses the others.
        #[arg(long)]
        hot_share: Option<f64>,
        /// Override the topology's `max_partition_drift` (e.g. `1m`; `30d` never pauses).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_partition_drift: Option<std::time::Duration>,
        /// `qos`: the QoS windows alone. `qoe`: QoS windows with the session lifecycle and
        /// early results, and DAU. `all`: `qoe` and the resume table behind its repartition
        /// topic.
        #[arg(long, value_enum, default_value = "qos")]
        operators: marquee::tools::bench::Operators,
        /// `at-least-once`, or `exactly-once` (Kafka transactions; not on Tansu).
        #[arg(long, value_enum, default_value = "at-least-once")]
        guarantee: marquee::config::Guarantee,
        /// Instances in the consumer group, in this process, each with its own state.
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            topology,
            brokers,
            registry,
            http,
            state_dir,
            instance_id,
        } => {
            let mut topology = Topology::load(&topology)?;
            if let Some(dir) = state_dir {
                topology.state.dir = dir;
            }
            let shutdown = shutdown_on_signal()?;
            let endpoints = Endpoints {
                brokers,
                registry,
                http: Some(http),
                instance_id,
            };
            app::run(
                &topology,
                &endpoints,
                &shutdown,
                Arc::new(Health::default()),
                None,
            )?;
        }
        Command::Validate { topology: path } => {
            let topology = Topology::load(&path)?;
            let mut operators = Vec::new();
            if let Some(qos) = &topology.qos {
                operators.push(format!(
                    "QoS windows of {:?} with {:?} grace",
                    qos.window, qos.grace
                ));
            }
            if let Some(resume) = &topology.resume {
                operators.push(format!("resume table into {}", resume.topic));
            }
            println!(
                "{}: ok (topology {:?}, input {}, {}, state in {})",
                path.display(),
                topology.name,
                topology.source.topic,
                operators.join(" and "),
                topology.state.dir.display()
            );
        }
        Command::Gen {
            brokers,
            registry,
            topic,
            count,
            rate,
            seed,
            disorder,
            late_share,
            late_delay,
        } => {
            if !(0.0..=1.0).contains(&late_share) {
                bail!("--late-share is {late_share}: expected a share between 0 and 1");
            }
            let shutdown = shutdown_on_signal()?;
            let registry = HttpRegistry::new(&registry)?;
            let publisher = Publisher::new(&brokers, &registry, &topic, None)?;
            let mut options = GenOptions {
                seed,
                disorder_ms: disorder.as_millis() as i64,
                late_share,
                late_delay_ms: late_delay.as_millis() as i64,
                ..GenOptions::default()
            };
            if let Some(rate) = rate {
                options = options.paced(rate, marquee::runtime::wall_clock_ms());
            }
            let started = Instant::now();
            let sent = publish(
                &publisher,
                Generator::new(options),
                count,
                rate.is_some(),
                &shutdown,
            )?;
            eprintln!(
                "sent {sent} events to {topic} in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        Command::Demo { rate, http } => {
            let shutdown = shutdown_on_signal()?;
            marquee::tools::demo::run(rate, Some(http), &shutdown)?;
        }
        Command::BenchQueries {
            events,
            requests,
            concurrency,
        } => {
            let report = marquee::tools::bench::queries(events, requests, concurrency)
                .context("query benchmark failed")?;
            println!("{report}");
        }
        Command::Bench {
            brokers,
            events,
            partitions,
            hot_share,
            max_partition_drift,
            operators,
            guarantee,
            instances,
        } => {
            let options = marquee::tools::bench::BenchOptions {
                events,
                partitions,
                hot_share,
                max_partition_drift,
                operators,
                guarantee,
                instances,
            };
            let report =
                marquee::tools::bench::run(&brokers, &options).context("benchmark failed")?;
            println!("{report}");
        }
    }
    Ok(())
}

/// A token cancelled by SIGTERM or Ctrl-C (a second signal exits at once).
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
            for n in 0.. {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if n > 0 {
                    std::process::exit(130);
                }
                tracing::info!("stopping: flushing outputs and checkpointing (signal again to exit at once)");
                cancel.cancel();
            }
        })
    })?;
    Ok(token)
}
