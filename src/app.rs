//! Builds one instance of a topology from its parts, runs it, and shuts it down in order:
//! stop consuming, emit, flush outputs, checkpoint state and offsets, close the store.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Topology;
use crate::decode::Decoder;
use crate::error::PipelineError;
use crate::http::{self, Health};
use crate::pipeline::{Pipeline, ResultHook};
use crate::registry::{HttpRegistry, SchemaRegistry};
use crate::sink::{ensure_topics, producer_config, OutputTopics, Sink};
use crate::source::{consumer_config, Source};
use crate::state::Store;

/// Where an instance finds Kafka and the schema registry, and where it serves HTTP.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Schema registry base URL.
    pub registry: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`; `None` serves nothing.
    pub http: Option<SocketAddr>,
}

/// Runs `topology` until `shutdown` is cancelled (or a fatal error), with the shared `health`.
pub fn run(
    topology: &Topology,
    endpoints: &Endpoints,
    shutdown: &CancellationToken,
    health: Arc<Health>,
    on_result: Option<ResultHook>,
) -> Result<(), PipelineError> {
    let prometheus = crate::metrics::install();
    let _http = match endpoints.http {
        Some(addr) => Some(
            http::start(addr, prometheus, Arc::clone(&health))
                .map_err(|e| PipelineError::Other(format!("cannot serve HTTP on {addr}: {e}")))?,
        ),
        None => None,
    };
    let result = run_pipeline(topology, endpoints, shutdown, &health, on_result);
    if let Err(e) = &result {
        health.fail(e.to_string());
    }
    result
}

fn run_pipeline(
    topology: &Topology,
    endpoints: &Endpoints,
    shutdown: &CancellationToken,
    health: &Arc<Health>,
    on_result: Option<ResultHook>,
) -> Result<(), PipelineError> {
    let registry: Arc<dyn SchemaRegistry> = Arc::new(HttpRegistry::new(&endpoints.registry)?);
    std::fs::create_dir_all(&topology.state.dir).map_err(|e| {
        PipelineError::Other(format!(
            "cannot create state directory {}: {e}",
            topology.state.dir.display()
        ))
    })?;
    let store = Arc::new(Store::open(
        &topology.state.dir,
        topology.state.block_cache_mib,
        topology.state.write_buffer_mib,
    )?);
    let producer = producer_config(&endpoints.brokers, &topology.sink.kafka);
    let topics = OutputTopics {
        results: topology.sink.topic.clone(),
        late: topology.sink.late_topic.clone(),
        dead_letter: topology.sink.dead_letter_topic.clone(),
    };
    ensure_topics(
        &producer,
        &[&topics.results, &topics.late, &topics.dead_letter],
        1,
    );
    let sink = Sink::new(&producer, topics, &topology.source.topic, registry.as_ref())?;
    let consumer = consumer_config(
        &endpoints.brokers,
        &topology.group_id(),
        &topology.source.kafka,
    );
    let source = Source::subscribe(&consumer, &topology.source.topic)?;
    tracing::info!(
        topology = %topology.name,
        topic = %topology.source.topic,
        group = %topology.group_id(),
        state = %topology.state.dir.display(),
        "pipeline starting"
    );
    let mut pipeline = Pipeline::new(
        topology,
        source,
        Decoder::new(registry),
        sink,
        store,
        Arc::clone(health),
    )?;
    if let Some(hook) = on_result {
        pipeline = pipeline.on_result(hook);
    }
    pipeline.run(shutdown)
}
