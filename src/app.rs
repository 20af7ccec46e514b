//! Builds one instance of a topology from its parts, runs it, and shuts it down in order:
//! stop consuming, emit, flush outputs, checkpoint state and offsets, close the store.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ResumeConfig, Topology};
use crate::decode::Decoder;
use crate::error::PipelineError;
use crate::http::{self, Health};
use crate::pipeline::{Pipeline, ResultHook};
use crate::registry::{HttpRegistry, SchemaRegistry};
use crate::resume::{self, TableStage, TableView, RESUME_POSITION_SCHEMA};
use crate::sink::{
    ensure_topics, producer_config, OutputTopics, Sink, TopicSpec, COMPACTED, QOS_WINDOW_SCHEMA,
};
use crate::source::{consumer_config, Source};
use crate::state::Store;

/// Where an instance finds Kafka and the schema registry, and where it serves HTTP.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Schema registry base URL.
    pub registry: String,
    /// Address of `/metrics`, `/healthz`, `/readyz` and table queries; `None` serves nothing.
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
    let table = topology
        .resume
        .as_ref()
        .map(|r| Arc::new(TableView::new(Arc::clone(&store), r.partitions)));
    let _http = match endpoints.http {
        Some(addr) => Some(
            http::start(addr, prometheus, Arc::clone(&health), table.clone())
                .map_err(|e| PipelineError::Other(format!("cannot serve HTTP on {addr}: {e}")))?,
        ),
        None => None,
    };
    let result = run_operators(
        topology, endpoints, shutdown, &health, store, table, on_result,
    );
    if let Err(e) = &result {
        health.fail(e.to_string());
    }
    result
}

/// Runs each declared operator on its own thread; the first failure stops them all.
fn run_operators(
    topology: &Topology,
    endpoints: &Endpoints,
    shutdown: &CancellationToken,
    health: &Arc<Health>,
    store: Arc<Store>,
    table: Option<Arc<TableView>>,
    on_result: Option<ResultHook>,
) -> Result<(), PipelineError> {
    let registry: Arc<dyn SchemaRegistry> = Arc::new(HttpRegistry::new(&endpoints.registry)?);
    let stop = shutdown.child_token();
    // Ready only once every operator is (each restores its state first).
    if topology.qos.is_some() {
        health.expect("qos");
    }
    if topology.resume.is_some() {
        health.expect("resume");
    }
    std::thread::scope(|scope| {
        let mut tasks = Vec::new();
        if let Some(qos) = topology.qos.clone() {
            let (registry, store, stop) = (Arc::clone(&registry), Arc::clone(&store), stop.clone());
            tasks.push(spawn_operator(scope, &stop.clone(), move || {
                run_qos(
                    topology, &qos, endpoints, registry, store, health, on_result, &stop,
                )
            }));
        }
        if let (Some(resume), Some(table)) = (topology.resume.clone(), table) {
            let (registry, stop) = (Arc::clone(&registry), stop.clone());
            tasks.push(spawn_operator(scope, &stop.clone(), move || {
                run_resume(
                    topology, &resume, endpoints, registry, table, health, &stop, scope,
                )
            }));
        }
        tasks
            .into_iter()
            .map(join_operator)
            .fold(Ok(()), Result::and)
    })
}

/// Runs `operator` on its own scoped thread. However it ends, a panic included, it cancels
/// `stop`, so the other operators end too and the process never keeps half a topology running.
fn spawn_operator<'scope, F>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    stop: &CancellationToken,
    operator: F,
) -> std::thread::ScopedJoinHandle<'scope, Result<(), PipelineError>>
where
    F: FnOnce() -> Result<(), PipelineError> + Send + 'scope,
{
    let stop = stop.clone();
    scope.spawn(move || {
        let _stop_all = stop.drop_guard();
        operator()
    })
}

/// Waits for an operator thread; a panic becomes an error that fails the instance.
fn join_operator(
    task: std::thread::ScopedJoinHandle<'_, Result<(), PipelineError>>,
) -> Result<(), PipelineError> {
    task.join()
        .unwrap_or_else(|_| Err(PipelineError::Other("an operator thread panicked".into())))
}

#[allow(clippy::too_many_arguments)]
fn run_qos(
    topology: &Topology,
    qos: &crate::config::QosConfig,
    endpoints: &Endpoints,
    registry: Arc<dyn SchemaRegistry>,
    store: Arc<Store>,
    health: &Arc<Health>,
    on_result: Option<ResultHook>,
    stop: &CancellationToken,
) -> Result<(), PipelineError> {
    let producer = producer_config(&endpoints.brokers, &topology.sink.kafka);
    let topics = OutputTopics {
        results: topology.sink.topic.clone(),
        late: topology.sink.late_topic.clone(),
        dead_letter: topology.sink.dead_letter_topic.clone(),
    };
    // Results are keyed by window and group: compaction only drops replayed duplicates.
    let topic = |name, configs| topic_spec(topology, name, topology.sink.partitions, configs);
    ensure_topics(
        &producer,
        &[
            topic(&topics.results, COMPACTED),
            topic(&topics.late, &[]),
            topic(&topics.dead_letter, &[]),
        ],
    )?;
    let sink = Sink::new(
        &producer,
        topics,
        &topology.source.topic,
        registry.as_ref(),
        QOS_WINDOW_SCHEMA,
    )?;
    let mut consumer = consumer_config(
        &endpoints.brokers,
        &topology.group_id(),
        &topology.source.kafka,
    );
    // Idle means caught up: partition EOF says the consumer has read all the broker holds.
    consumer.set("enable.partition.eof", "true");
    let source = Source::subscribe(&consumer, &topology.source.topic)?;
    tracing::info!(
        topology = %topology.name,
        topic = %topology.source.topic,
        group = %topology.group_id(),
        state = %topology.state.dir.display(),
        "QoS pipeline starting"
    );
    let mut pipeline = Pipeline::new(
        topology,
        qos,
        source,
        Decoder::new(registry),
        sink,
        store,
        Arc::clone(health),
    )?;
    if let Some(hook) = on_result {
        pipeline = pipeline.on_result(hook);
    }
    pipeline.run(stop)
}

#[allow(clippy::too_many_arguments)]
fn run_resume<'scope>(
    topology: &'scope Topology,
    resume: &ResumeConfig,
    endpoints: &'scope Endpoints,
    registry: Arc<dyn SchemaRegistry>,
    table: Arc<TableView>,
    health: &Arc<Health>,
    stop: &CancellationToken,
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> Result<(), PipelineError> {
    let producer = producer_config(&endpoints.brokers, &topology.sink.kafka);
    let repartition_topic = resume.repartition_topic(&topology.name);
    let table_input = if resume.input_keyed_by_profile {
        topology.source.topic.clone()
    } else {
        repartition_topic.clone()
    };
    let table_partitions = Some(resume.partitions);
    let mut topics = vec![
        topic_spec(topology, &resume.topic, table_partitions, COMPACTED),
        topic_spec(
            topology,
            &topology.sink.dead_letter_topic,
            topology.sink.partitions,
            &[],
        ),
    ];
    if !resume.input_keyed_by_profile {
        topics.push(topic_spec(
            topology,
            &repartition_topic,
            table_partitions,
            &[],
        ));
    }
    ensure_topics(&producer, &topics)?;
    resume::restore(&table.store, &endpoints.brokers, resume, registry.as_ref())?;

    let dead_letters = |source_topic: &str| {
        let topics = OutputTopics {
            results: resume.topic.clone(),
            late: topology.sink.late_topic.clone(),
            dead_letter: topology.sink.dead_letter_topic.clone(),
        };
        Sink::new(
            &producer,
            topics,
            source_topic,
            registry.as_ref(),
            RESUME_POSITION_SCHEMA,
        )
    };
    let repartitioner = if resume.input_keyed_by_profile {
        None
    } else {
        let sink = dead_letters(&topology.source.topic)?;
        let target = producer
            .create_with_context(crate::sink::DeliveryTracker::default())
            .map_err(PipelineError::kafka("creating the repartition producer"))?;
        let decoder = Decoder::new(Arc::clone(&registry));
        let (resume, stop) = (resume.clone(), stop.clone());
        Some(spawn_operator(scope, &stop.clone(), move || {
            resume::repartition(
                topology,
                &resume,
                &endpoints.brokers,
                decoder,
                sink,
                target,
                &stop,
            )
        }))
    };
    let consumer = consumer_config(
        &endpoints.brokers,
        &format!("{}-resume", topology.group_id()),
        &topology.source.kafka,
    );
    let source = Source::subscribe(&consumer, &table_input)?;
    tracing::info!(topology = %topology.name, input = %table_input, output = %resume.topic, "resume table starting");
    let stage = TableStage::new(
        topology,
        resume,
        Decoder::new(Arc::clone(&registry)),
        dead_letters(&table_input)?,
        table,
        Arc::clone(health),
    );
    let result = stage.run(&source, stop);
    stop.cancel();
    let repartitioned = repartitioner.map_or(Ok(()), join_operator);
    result.and(repartitioned)
}

/// A topic this instance creates if it is missing, with the topology's replication factor.
fn topic_spec<'a>(
    topology: &Topology,
    name: &'a str,
    partitions: Option<i32>,
    configs: &'a [(&'a str, &'a str)],
) -> TopicSpec<'a> {
    TopicSpec {
        name,
        partitions,
        replication_factor: topology.sink.replication_factor,
        configs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_panicking_operator_stops_the_others_and_fails_the_instance() {
        let stop = CancellationToken::new();
        let result = std::thread::scope(|scope| {
            let watcher = stop.clone();
            let waiting = spawn_operator(scope, &stop, move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !watcher.is_cancelled() {
                    if Instant::now() > deadline {
                        return Err(PipelineError::Other("never told to stop".into()));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            });
            let panicking = spawn_operator(scope, &stop, || panic!("an operator bug"));
            let failed = join_operator(panicking);
            (failed, join_operator(waiting))
        });
        assert!(matches!(result.0, Err(PipelineError::Other(m)) if m.contains("panicked")));
        assert!(result.1.is_ok(), "the other operator was stopped");
    }
}
