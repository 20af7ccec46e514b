//! `marquee demo`: the QoS job with nothing to install. librdkafka's mock cluster stands in for
//! Kafka, an embedded registry for the schema registry, and the generator sends live events
//! (event time = now, with disorder and a few late events) while windows are printed as they
//! close.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Endpoints};
use crate::config::Topology;
use crate::error::PipelineError;
use crate::io::registry::{EmbeddedRegistry, HttpRegistry};
use crate::runtime::wall_clock_ms;
use crate::serve::http::Health;
use crate::tools::gen::{publish, GenOptions, Generator, Publisher};

/// The demo topology: short windows so the first result shows within seconds.
pub const DEMO_TOPOLOGY: &str = include_str!("../../topologies/demo.toml");

/// Runs the demo until `shutdown`, generating `rate` events per second.
pub fn run(
    rate: u32,
    http: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    let state = std::env::temp_dir().join(format!("marquee-demo-{}", std::process::id()));
    let mut topology = Topology::parse(DEMO_TOPOLOGY, Path::new("topologies/demo.toml"))?;
    topology.state.dir = state.clone();
    let qos = topology
        .qos
        .clone()
        .ok_or_else(|| PipelineError::Other("the demo topology has no [qos]".into()))?;
    let kafka =
        MockCluster::new(1).map_err(PipelineError::kafka("starting the in-process Kafka"))?;
    kafka
        .create_topic(&topology.source.topic, 4, 1)
        .map_err(PipelineError::kafka("creating the demo input topic"))?;
    // The mock cluster does not answer CreateTopics: make the outputs here.
    let sink = &topology.sink;
    let dau = topology.dau.as_ref().map(|d| &d.topic);
    for topic in [&sink.topic, &sink.late_topic, &sink.dead_letter_topic]
        .into_iter()
        .chain(dau)
    {
        kafka
            .create_topic(topic, 1, 1)
            .map_err(PipelineError::kafka(format!(
                "creating the demo topic {topic}"
            )))?;
    }
    for (topic, partitions) in crate::app::internal_topics(&topology, 4) {
        kafka
            .create_topic(&topic, partitions, 1)
            .map_err(PipelineError::kafka(format!(
                "creating the demo topic {topic}"
            )))?;
    }
    let registry = EmbeddedRegistry::start()
        .map_err(|e| PipelineError::Other(format!("starting the embedded registry: {e}")))?;
    let endpoints = Endpoints {
        brokers: kafka.bootstrap_servers(),
        registry: registry.url(),
        http,
        instance_id: None,
    };
    if let Some(addr) = http {
        // First: a newcomer opens the charts while the first windows close.
        println!("marquee demo: the live dashboard is at http://{addr}/dashboard");
        println!("metrics at http://{addr}/metrics");
    }
    println!(
        "in-process Kafka at {}, registry at {}",
        endpoints.brokers, endpoints.registry
    );
    println!(
        "windows of {:?} close {:?} after their end; Ctrl-C stops\n",
        qos.window,
        qos.grace + topology.time.out_of_orderness
    );

    let generator = {
        let (brokers, registry, topic, stop) = (
            endpoints.brokers.clone(),
            endpoints.registry.clone(),
            topology.source.topic.clone(),
            shutdown.clone(),
        );
        std::thread::spawn(move || generate_live(&brokers, &registry, &topic, rate, &stop))
    };
    let print: crate::operators::qos::ResultHook = Box::new(|w| {
        if w.dimension == "all" {
            println!(
                "{} window {}s  viewers {:>5}  play {:>8}s  rebuffer ratio {}",
                crate::tools::demo::clock(w.window_start),
                (w.window_end - w.window_start) / 1000,
                w.concurrent_viewers,
                w.play_ms / 1000,
                w.rebuffer_ratio.map_or("-".into(), |r| format!("{:.4}", r)),
            );
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            println!(
                "           attempts {:>4}  start failures {:>3}  exits before start {:>3}  startup p50/p90/p99 {}/{}/{} ms  bitrate {} kbps",
                w.attempts.unwrap_or(0),
                w.video_start_failures.unwrap_or(0),
                w.exits_before_video_start.unwrap_or(0),
                ms(w.startup_ms_p50),
                ms(w.startup_ms_p90),
                ms(w.startup_ms_p99),
                ms(w.avg_bitrate_kbps),
            );
        } else if w.dimension == "cdn" {
            println!(
                "           cdn {:<11} viewers {:>5}  rebuffer events {:>4}  rebuffer ratio {}",
                w.value,
                w.concurrent_viewers,
                w.rebuffer_events,
                w.rebuffer_ratio.map_or("-".into(), |r| format!("{:.4}", r)),
            );
        }
    });
    let result = app::run(
        &topology,
        &endpoints,
        shutdown,
        Arc::new(Health::default()),
        Some(print),
    );
    shutdown.cancel();
    let generated = generator
        .join()
        .unwrap_or_else(|_| Err(PipelineError::Other("generator panicked".into())));
    let _ = std::fs::remove_dir_all(&state);
    result.and(generated)
}

/// Sends events at `rate` per second with event times following the wall clock.
fn generate_live(
    brokers: &str,
    registry: &str,
    topic: &str,
    rate: u32,
    stop: &CancellationToken,
) -> Result<(), PipelineError> {
    let registry = HttpRegistry::new(registry)?;
    let publisher = Publisher::new(brokers, &registry, topic, None)?;
    let options = GenOptions {
        seed: wall_clock_ms() as u64,
        heartbeat_ms: 5_000,
        max_watch_ms: 120_000,
        disorder_ms: 1_000,
        late_share: 0.002,
        late_delay_ms: 15_000,
        ..GenOptions::default()
    }
    .paced(rate, wall_clock_ms());
    publish(&publisher, Generator::new(options), None, true, stop).map(|_| ())
}

/// `HH:MM:SS` of an epoch-millis time, UTC.
pub fn clock(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
