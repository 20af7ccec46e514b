//! Builds one instance of a topology from its parts, runs it, and shuts it down in order:
//! stop consuming, emit, flush outputs, checkpoint state and offsets, close the store.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{EmitPolicy, Guarantee, ResumeConfig, Topology};
use crate::error::PipelineError;
use crate::io::changelog::Changelog;
use crate::io::decode::Decoder;
use crate::io::registry::{HttpRegistry, SchemaRegistry};
use crate::io::sink::{
    ensure_topics, producer_config, Output, Sink, TopicSpec, COMPACTED, DAILY_ACTIVE_SCHEMA,
    QOS_WINDOW_SCHEMA,
};
use crate::io::source::{consumer_config, Source};
use crate::operators::dau::DailyActiveUsers;
use crate::operators::partials::PartialsTopic;
use crate::operators::qos::{GlobalWatermark, QosWindows, ResultHook};
use crate::operators::repartition::Repartition;
use crate::operators::table::ResumeTable;
use crate::resume::{TableView, RESUME_POSITION_SCHEMA};
use crate::runtime::merge::{DayMerge, Merge, MergeOptions, WindowMerge, MERGE_TASK};
use crate::runtime::{Operator, Task, TaskOptions, Transactions};
use crate::serve::http::{self, Health};
use crate::state::{Store, CF_DAILY, CF_QOE, CF_RESUME, CF_SESSIONS, CF_WINDOWS, POSITIONS};
use crate::window::{slot, WindowSpec};
use std::sync::atomic::AtomicI64;

/// Where an instance finds Kafka and the schema registry, and where it serves HTTP.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Schema registry base URL.
    pub registry: String,
    /// Address of `/metrics`, `/healthz`, `/readyz` and table queries; `None` serves nothing.
    pub http: Option<SocketAddr>,
    /// This instance's stable name: its static membership in its consumer groups, and its
    /// transactional ids. `None`: dynamic membership, and transactional ids named after the
    /// host and the state directory (what a restarted instance keeps).
    pub instance_id: Option<String>,
}

/// How long a restore may read nothing from the changelog before it fails.
const RESTORE_STALL: std::time::Duration = std::time::Duration::from_secs(120);

/// The instance's name: the one given, or the host name and a hash of the state directory.
pub fn instance_id(topology: &Topology, endpoints: &Endpoints) -> String {
    if let Some(id) = &endpoints.instance_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "marquee".into());
    let dir = std::fs::canonicalize(&topology.state.dir).unwrap_or(topology.state.dir.clone());
    let mut hash = rustc_hash::FxHasher::default();
    std::hash::Hash::hash(&dir, &mut hash);
    format!("{host}-{:016x}", std::hash::Hasher::finish(&hash))
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

/// Name of the task reading the input topic (its offsets in the meta column family, its
/// readiness in `/readyz`), and the name its offsets had when only QoS windows read it.
pub const INPUT_TASK: &str = "input";
const INPUT_TASK_BEFORE: &str = "qos";
/// Name of the task reading the repartition topic into the resume table.
pub const TABLE_TASK: &str = "resume";

/// Runs one task per input topic on its own thread (the input, and the repartition topic when
/// the table needs it); the first failure stops them all.
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
    let producer = producer_config(&endpoints.brokers, &topology.sink.kafka);
    let repartition_topic = topology
        .resume
        .as_ref()
        .map(|r| r.repartition_topic(&topology.name));
    // Internal topics are partitioned like the input: it must exist before anything is made.
    let input_partitions = input_partitions(&producer, &topology.source.topic)?;
    ensure_topics(
        &producer,
        &output_topics(
            topology,
            repartition_topic.as_deref(),
            marker_topic(topology).as_deref(),
        ),
    )?;
    if let Some(changelog) = input_changelog(topology, endpoints) {
        changelog.ensure_topics(input_partitions)?;
    }
    if let Some((resume, changelog)) = topology
        .resume
        .as_ref()
        .zip(table_changelog(topology, endpoints))
    {
        changelog.ensure_topics(resume.partitions)?;
    }
    let two_phase = topology.qos.is_some() || topology.dau.is_some();
    let partials = two_phase.then(|| PartialsTopic {
        topic: partials_topic(topology),
        partitions: input_partitions,
    });
    if let Some(partials) = &partials {
        let spec = topic_spec(topology, &partials.topic, Some(input_partitions), COMPACTED);
        ensure_topics(&producer, &[spec])?;
    }
    let global: GlobalWatermark = Arc::new(AtomicI64::new(i64::MIN));
    let resume = topology.resume.as_ref().zip(table);
    // The table reads the input itself when the input is already keyed by profile.
    let (table_on_input, table_task) = match resume {
        Some((r, view)) if r.input_keyed_by_profile => (Some((r, view)), None),
        other => (None, other),
    };
    let input_has_operators =
        topology.qos.is_some() || topology.resume.is_some() || topology.dau.is_some();
    // Ready only once every task is (each restores its state first).
    if input_has_operators {
        health.expect(INPUT_TASK);
    }
    if table_task.is_some() {
        health.expect(TABLE_TASK);
    }
    if two_phase {
        health.expect(MERGE_TASK);
    }
    let stop = shutdown.child_token();
    std::thread::scope(|scope| {
        let mut tasks = Vec::new();
        if input_has_operators {
            let (registry, store, stop) = (Arc::clone(&registry), Arc::clone(&store), stop.clone());
            let table = table_on_input.map(|(r, v)| (r.clone(), v));
            let repartition = table_task.as_ref().map(|(r, _)| r.partitions);
            let repartition_topic = repartition_topic.as_deref();
            let (partials, global) = (partials.clone(), Arc::clone(&global));
            tasks.push(spawn_task(scope, &stop.clone(), move || {
                let mut operators: Vec<Box<dyn Operator>> = Vec::new();
                if let (Some(qos), Some(partials)) = (&topology.qos, partials.clone()) {
                    let windows =
                        QosWindows::new(qos, Arc::clone(&store), partials, Arc::clone(&global))?;
                    operators.push(Box::new(windows));
                }
                if let (Some(dau), Some(partials)) = (&topology.dau, partials) {
                    let operator =
                        DailyActiveUsers::new(dau, Arc::clone(&store), partials, global)?;
                    operators.push(Box::new(operator));
                }
                if let (Some(partitions), Some(topic)) = (repartition, repartition_topic) {
                    operators.push(Box::new(Repartition::new(topic, partitions)));
                }
                if let Some((resume, view)) = table {
                    operators.push(table_operator(topology, &resume, view, registry.as_ref())?);
                }
                let task = input_task(topology, endpoints, registry, store, operators, health)?;
                task.run(&stop)
            }));
        }
        if let Some(partials) = &partials {
            let (registry, stop) = (Arc::clone(&registry), stop.clone());
            tasks.push(spawn_task(scope, &stop.clone(), move || {
                let windows = match &topology.qos {
                    Some(qos) => Some(WindowMerge {
                        spec: WindowSpec::new(
                            qos.window,
                            qos.advance.unwrap_or(qos.window),
                            qos.grace,
                        ),
                        qoe: qos.qoe,
                        gauge_slots: qos.gauge_dimensions.iter().map(|d| slot(*d)).collect(),
                        early_interval: (qos.emit == EmitPolicy::Early)
                            .then_some(qos.early_interval),
                        results: Output::register(
                            registry.as_ref(),
                            &topology.sink.topic,
                            QOS_WINDOW_SCHEMA,
                        )?,
                    }),
                    None => None,
                };
                let days = match &topology.dau {
                    Some(dau) => Some(DayMerge {
                        grace: dau.grace.as_millis() as i64,
                        interval: dau.interval,
                        output: Output::register(
                            registry.as_ref(),
                            &dau.topic,
                            DAILY_ACTIVE_SCHEMA,
                        )?,
                    }),
                    None => None,
                };
                let group = format!("{}-merge", topology.group_id());
                let exactly_once = topology.processing.guarantee == Guarantee::ExactlyOnce;
                let (source, sink) = connect(
                    topology,
                    endpoints,
                    &partials.topic,
                    &group,
                    MERGE_TASK,
                    exactly_once,
                )?;
                let options = MergeOptions {
                    topic: partials.topic.clone(),
                    sources: partials.partitions,
                    checkpoint_interval: topology.state.checkpoint_interval,
                    windows,
                    days,
                };
                let health = Arc::clone(health);
                Merge::new(options, source, sink, global, on_result, health).run(&stop)
            }));
        }
        if let Some((resume, view)) = table_task {
            let (registry, store, stop) = (Arc::clone(&registry), Arc::clone(&store), stop.clone());
            tasks.push(spawn_task(scope, &stop.clone(), move || {
                let table = table_operator(topology, resume, view, registry.as_ref())?;
                let source_topic = resume.repartition_topic(&topology.name);
                let group = table_group(topology);
                let options = TaskOptions {
                    name: TABLE_TASK,
                    legacy_name: None,
                    max_drift_ms: None,
                    late_topic: None,
                    transactions: transactions(topology, endpoints, &group, TABLE_TASK),
                    changelog: table_changelog(topology, endpoints),
                    ..task_options(topology)
                };
                let task = task(
                    topology,
                    endpoints,
                    &source_topic,
                    &group,
                    options,
                    registry,
                    store,
                    vec![table],
                    health,
                )?;
                task.run(&stop)
            }));
        }
        tasks.into_iter().map(join_task).fold(Ok(()), Result::and)
    })
}

/// Runs `task` on its own scoped thread. However it ends, a panic included, it cancels `stop`,
/// so the other tasks end too and the process never keeps half a topology running.
fn spawn_task<'scope, F>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    stop: &CancellationToken,
    task: F,
) -> std::thread::ScopedJoinHandle<'scope, Result<(), PipelineError>>
where
    F: FnOnce() -> Result<(), PipelineError> + Send + 'scope,
{
    let stop = stop.clone();
    scope.spawn(move || {
        let _stop_all = stop.drop_guard();
        task()
    })
}

/// Waits for a task thread; a panic becomes an error that fails the instance.
fn join_task(
    task: std::thread::ScopedJoinHandle<'_, Result<(), PipelineError>>,
) -> Result<(), PipelineError> {
    task.join().unwrap_or_else(|_| {
        Err(PipelineError::Other(
            "a task thread panicked (an operator bug)".into(),
        ))
    })
}

/// Every topic the topology writes, with its partitions and settings; `repartition_topic` is
/// the resume table's internal topic, when it has one.
fn output_topics<'a>(
    topology: &'a Topology,
    repartition_topic: Option<&'a str>,
    marker_topic: Option<&'a str>,
) -> Vec<TopicSpec<'a>> {
    let sink = &topology.sink;
    let mut topics = vec![topic_spec(
        topology,
        &sink.dead_letter_topic,
        sink.partitions,
        &[],
    )];
    if topology.qos.is_some() {
        // Results are keyed by window and group: compaction only drops replayed duplicates.
        topics.push(topic_spec(
            topology,
            &sink.topic,
            sink.partitions,
            COMPACTED,
        ));
    }
    if let Some(dau) = &topology.dau {
        topics.push(topic_spec(topology, &dau.topic, sink.partitions, COMPACTED));
    }
    if topology.qos.is_some() || topology.dau.is_some() {
        topics.push(topic_spec(topology, &sink.late_topic, sink.partitions, &[]));
    }
    if let Some(marker) = marker_topic {
        topics.push(topic_spec(topology, marker, Some(1), COMPACTED));
    }
    if let Some(resume) = &topology.resume {
        let partitions = Some(resume.partitions);
        topics.push(topic_spec(topology, &resume.topic, partitions, COMPACTED));
        if let Some(name) = repartition_topic.filter(|_| !resume.input_keyed_by_profile) {
            topics.push(topic_spec(topology, name, partitions, &[]));
        }
    }
    topics
}

/// The topology's time and checkpoint settings, for a task with alignment when it has [qos].
fn task_options(topology: &Topology) -> TaskOptions {
    let time = &topology.time;
    TaskOptions {
        name: INPUT_TASK,
        legacy_name: Some(INPUT_TASK_BEFORE),
        out_of_orderness: time.out_of_orderness,
        idle_timeout: time.idle_timeout,
        max_future_skew_ms: time.max_future_skew.as_millis() as i64,
        // Alignment bounds the open windows (and days) while a backlog is read.
        max_drift_ms: (topology.qos.is_some() || topology.dau.is_some())
            .then_some(time.max_partition_drift.as_millis() as i64),
        late_topic: Some(topology.sink.late_topic.clone()),
        transactions: None,
        changelog: None,
        checkpoint_interval: topology.state.checkpoint_interval,
        standby_replicas: topology.state.standby_replicas,
    }
}

/// Exactly-once: the topic where each task's transactions mark the checkpoints they commit.
fn marker_topic(topology: &Topology) -> Option<String> {
    (topology.processing.guarantee == Guarantee::ExactlyOnce)
        .then(|| format!("{}-transactions", topology.group_id()))
}

/// The number of partitions of the input topic; an error naming it when it does not exist.
fn input_partitions(config: &rdkafka::ClientConfig, topic: &str) -> Result<i32, PipelineError> {
    crate::io::sink::partitions_of(config, topic)?.ok_or_else(|| {
        PipelineError::Other(format!(
            "the input topic {topic} does not exist: create it (with at least as many partitions \
             as instances you will run), or set `source.topic` to an existing topic"
        ))
    })
}

/// The changelog topics of the input task's stores: the QoS windows (and sessions and QoE
/// with `qos.qoe`), the DAU days, and the input positions they stand for.
pub fn input_changelog(topology: &Topology, endpoints: &Endpoints) -> Option<Changelog> {
    let stores = changelogged_stores(topology);
    (!stores.is_empty())
        .then(|| changelog(topology, endpoints, &topology.group_id(), &stores, None))
}

/// The changelogs of the table task (the table and its positions), when it has one.
fn table_changelog(topology: &Topology, endpoints: &Endpoints) -> Option<Changelog> {
    let resume = topology
        .resume
        .as_ref()
        .filter(|r| !r.input_keyed_by_profile)?;
    let deadline = Some((resume.restore_timeout, "resume.restore_timeout"));
    Some(changelog(
        topology,
        endpoints,
        &table_group(topology),
        &[CF_RESUME, POSITIONS],
        deadline,
    ))
}

/// The changelogs of `stores` of consumer group `group`.
fn changelog(
    topology: &Topology,
    endpoints: &Endpoints,
    group: &str,
    stores: &[&'static str],
    deadline: Option<(std::time::Duration, &'static str)>,
) -> Changelog {
    Changelog::new(
        group,
        stores,
        consumer_config(&endpoints.brokers, group, &topology.source.kafka),
        topology.sink.replication_factor,
        topology.processing.guarantee == Guarantee::ExactlyOnce,
        RESTORE_STALL,
        deadline,
    )
}

/// The consumer group of the table task (it reads the repartition topic).
fn table_group(topology: &Topology) -> String {
    format!("{}-resume", topology.group_id())
}

/// The stores of the input task that have changelogs (none when it has no moving state).
fn changelogged_stores(topology: &Topology) -> Vec<&'static str> {
    let mut stores = Vec::new();
    if let Some(qos) = &topology.qos {
        stores.push(CF_WINDOWS);
        if qos.qoe {
            stores.extend([CF_QOE, CF_SESSIONS]);
        }
    }
    if topology.dau.is_some() {
        stores.push(CF_DAILY);
    }
    if topology
        .resume
        .as_ref()
        .is_some_and(|r| r.input_keyed_by_profile)
    {
        stores.push(CF_RESUME);
    }
    if !stores.is_empty() {
        stores.push(POSITIONS);
    }
    stores
}

/// The partials topic (between the two phases of QoS and DAU) of the topology's group.
fn partials_topic(topology: &Topology) -> String {
    format!("{}-partials", topology.group_id())
}

/// The internal topics (changelogs, QoS partials) with their partitions, for brokers that
/// cannot create topics on request (the demo's mock cluster).
pub fn internal_topics(topology: &Topology, input_partitions: i32) -> Vec<(String, i32)> {
    let group = topology.group_id();
    let mut topics: Vec<(String, i32)> = changelogged_stores(topology)
        .into_iter()
        .map(|s| {
            (
                crate::io::changelog::topic_name(&group, s),
                input_partitions,
            )
        })
        .collect();
    if topology.qos.is_some() || topology.dau.is_some() {
        topics.push((partials_topic(topology), input_partitions));
    }
    if let Some(resume) = topology
        .resume
        .as_ref()
        .filter(|r| !r.input_keyed_by_profile)
    {
        for store in [CF_RESUME, POSITIONS] {
            let topic = crate::io::changelog::topic_name(&table_group(topology), store);
            topics.push((topic, resume.partitions));
        }
    }
    topics
}

/// The task reading the topology's input.
fn input_task(
    topology: &Topology,
    endpoints: &Endpoints,
    registry: Arc<dyn SchemaRegistry>,
    store: Arc<Store>,
    operators: Vec<Box<dyn Operator>>,
    health: &Arc<Health>,
) -> Result<Task, PipelineError> {
    let names: Vec<&str> = operators.iter().map(|o| o.name()).collect();
    tracing::info!(
        topology = %topology.name,
        topic = %topology.source.topic,
        group = %topology.group_id(),
        state = %topology.state.dir.display(),
        operators = ?names,
        "input task starting"
    );
    task(
        topology,
        endpoints,
        &topology.source.topic,
        &topology.group_id(),
        TaskOptions {
            transactions: transactions(topology, endpoints, &topology.group_id(), INPUT_TASK),
            changelog: input_changelog(topology, endpoints),
            ..task_options(topology)
        },
        registry,
        store,
        operators,
        health,
    )
}

/// A task over `topic` in consumer group `group`, with its own producer.
#[allow(clippy::too_many_arguments)]
fn task(
    topology: &Topology,
    endpoints: &Endpoints,
    topic: &str,
    group: &str,
    options: TaskOptions,
    registry: Arc<dyn SchemaRegistry>,
    store: Arc<Store>,
    operators: Vec<Box<dyn Operator>>,
    health: &Arc<Health>,
) -> Result<Task, PipelineError> {
    let transactional = options.transactions.is_some();
    let (source, sink) = connect(
        topology,
        endpoints,
        topic,
        group,
        options.name,
        transactional,
    )?;
    Ok(Task::new(
        options,
        source,
        Decoder::new(registry),
        sink,
        store,
        operators,
        Arc::clone(health),
    ))
}

/// Exactly-once: where task `name` of consumer group `group` records its checkpoints.
fn transactions(
    topology: &Topology,
    endpoints: &Endpoints,
    group: &str,
    name: &str,
) -> Option<Transactions> {
    marker_topic(topology).map(|marker_topic| Transactions {
        marker_topic,
        marker_key: transactional_id(topology, endpoints, group, name),
        brokers: endpoints.brokers.clone(),
    })
}

/// The transactional id of task `name` of consumer group `group` on this instance.
fn transactional_id(topology: &Topology, endpoints: &Endpoints, group: &str, name: &str) -> String {
    format!("{group}-{name}-{}", instance_id(topology, endpoints))
}

/// A member of consumer group `group` reading `topic` (partition ends reported, static
/// membership, committed data only with exactly-once), and the producer of task `name`:
/// transactional with one id per task and instance, so a restarted instance fences its
/// earlier self and other instances are fenced through the group's generation.
fn connect(
    topology: &Topology,
    endpoints: &Endpoints,
    topic: &str,
    group: &str,
    name: &str,
    transactional: bool,
) -> Result<(Source, Sink), PipelineError> {
    let producer = producer_config(&endpoints.brokers, &topology.sink.kafka);
    let dead_letter = &topology.sink.dead_letter_topic;
    let sink = if transactional {
        let id = transactional_id(topology, endpoints, group, name);
        Sink::transactional(&producer, dead_letter, topic, &id)?
    } else {
        Sink::new(&producer, dead_letter, topic)?
    };
    let mut consumer = consumer_config(&endpoints.brokers, group, &topology.source.kafka);
    // Idle means caught up: partition EOF says the consumer has read all the broker holds.
    consumer.set("enable.partition.eof", "true");
    // Static membership with a name given (`--instance-id` or `group.instance.id`): a
    // restarting instance keeps its partitions without a rebalance. One id per consumer, as
    // the input, the merge and the table are members of different groups. Opt-in, as in Kafka
    // Streams: Tansu 0.6 rebalances in a loop with it.
    let member = consumer
        .get("group.instance.id")
        .map(str::to_string)
        .or_else(|| endpoints.instance_id.clone());
    if let Some(id) = member {
        consumer.set("group.instance.id", format!("{id}-{name}"));
    }
    // Members find themselves in the group's description by it (standby placement).
    if consumer.get("client.id").is_none() {
        consumer.set(
            "client.id",
            format!("{}-{name}", instance_id(topology, endpoints)),
        );
    }
    if transactional {
        // Upstream transactions that aborted are never read.
        consumer.set("isolation.level", "read_committed");
    }
    Ok((Source::subscribe(&consumer, topic)?, sink))
}

/// The resume-table operator.
fn table_operator(
    topology: &Topology,
    resume: &ResumeConfig,
    view: Arc<TableView>,
    registry: &dyn SchemaRegistry,
) -> Result<Box<dyn Operator>, PipelineError> {
    tracing::info!(topology = %topology.name, output = %resume.topic, "resume table starting");
    let output = Output::register(registry, &resume.topic, RESUME_POSITION_SCHEMA)?;
    Ok(Box::new(ResumeTable::new(
        resume,
        view,
        output,
        topology.state.checkpoint_interval,
    )))
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
            let waiting = spawn_task(scope, &stop, move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !watcher.is_cancelled() {
                    if Instant::now() > deadline {
                        return Err(PipelineError::Other("never told to stop".into()));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            });
            let panicking = spawn_task(scope, &stop, || panic!("an operator bug"));
            let failed = join_task(panicking);
            (failed, join_task(waiting))
        });
        assert!(matches!(result.0, Err(PipelineError::Other(m)) if m.contains("panicked")));
        assert!(result.1.is_ok(), "the other operator was stopped");
    }
}
