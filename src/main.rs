//! The `marquee` command: parses arguments, sets up logging and signals, calls the library.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use marquee::app::{self, Endpoints};
use marquee::config::Topology;
use marquee::io::registry::HttpRegistry;
use marquee::io::sink::{ensure_topics, partitions_of, producer_config, TopicSpec};
use marquee::serve::http::Health;
use marquee::tools::gen::{publish, GenOptions, Generator, Publisher};

/// Real-time QoS aggregates from video playback events.
#[derive(Parser)]
#[command(name = "marquee", version)]
struct Cli {
    /// Log lines as text (coloured on a terminal, unless NO_COLOR is set) or as one JSON
    /// object per line, for log shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "MARQUEE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// What a topology is doing: consumer lag, owner and watermark per input partition (from
    /// the cluster and the instances), readiness, state size and restores per instance.
    Status {
        /// Topology file.
        topology: PathBuf,
        /// Kafka bootstrap servers.
        #[arg(long, env = "MARQUEE_BROKERS", default_value = "localhost:9092")]
        brokers: String,
        /// An instance's HTTP address (its `--http`); repeat for each instance.
        #[arg(long = "instance")]
        instances: Vec<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
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
        /// Topic to write; created when it does not exist.
        #[arg(long, default_value = "playback-events")]
        topic: String,
        /// Partitions of the topic when `gen` creates it (an existing topic is kept as it is).
        #[arg(long, default_value_t = 6)]
        partitions: i32,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // What went wrong and why, without a stack trace (RUST_BACKTRACE is for panics, which
        // are bugs): an error here is the user's to act on.
        Err(error) if cli.log_format == LogFormat::Json => {
            tracing::error!(error = format!("{error:#}"), "marquee stopped");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (default: info, and warnings of librdkafka).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            logs.with_ansi(colour).init();
        }
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
        Command::Status {
            topology,
            brokers,
            instances,
            json,
        } => {
            let topology = Topology::load(&topology)?;
            let status = marquee::tools::status::read(&topology, &brokers, &instances)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
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
            partitions,
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
            if partitions < 1 {
                bail!("--partitions is {partitions}: expected at least 1");
            }
            let spec = TopicSpec {
                name: &topic,
                partitions: Some(partitions),
                replication_factor: None,
                configs: &[],
            };
            let client = producer_config(&brokers, &BTreeMap::new());
            ensure_topics(&client, &[spec])?;
            if partitions_of(&client, &topic)?.is_none() {
                bail!(
                    "topic {topic} does not exist and the cluster at {brokers} did not create \
                     it: create it yourself (e.g. kafka-topics.sh --bootstrap-server {brokers} \
                     --create --topic {topic} --partitions {partitions}) and run gen again"
                );
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
