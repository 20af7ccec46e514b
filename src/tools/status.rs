//! `marquee status`: what a topology is doing, from the cluster (each input partition's
//! committed offset, end, lag and owner) and from the instances' HTTP endpoints (readiness,
//! watermarks, state size, restores, late and dead-letter counts).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Guarantee, Topology};
use crate::error::PipelineError;
use crate::io::source::assigned_partitions;
use crate::serve::exposition::Samples as Metrics;

/// How long one cluster request or one instance may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A topology's state as `marquee status` reports it.
#[derive(Debug, Serialize)]
pub struct Status {
    pub topology: String,
    pub group: String,
    pub topic: String,
    pub partitions: Vec<PartitionStatus>,
    pub instances: Vec<InstanceStatus>,
}

/// One input partition.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The group's committed offset (the next record to process).
    pub committed: Option<i64>,
    /// The partition's end (committed records only with exactly-once).
    pub end: i64,
    /// Records between the committed offset and the end.
    pub lag: i64,
    /// The instance that owns it (its `--instance-id`, or host and state-directory hash).
    pub owner: Option<String>,
    /// Event-time watermark, from the owner's metrics.
    pub watermark_ms: Option<i64>,
    pub watermark_lag_seconds: Option<f64>,
    pub idle: Option<bool>,
    pub late_records: Option<u64>,
    pub dead_lettered_records: Option<u64>,
}

/// One instance's HTTP endpoint.
#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    pub address: String,
    pub reachable: bool,
    pub ready: bool,
    /// `/readyz`'s answer (what it waits for while not ready).
    pub readiness: String,
    pub state_bytes: Option<u64>,
    /// Changelog records left to restore, per task (0: none under way).
    pub restore_remaining: BTreeMap<String, u64>,
    pub standby_partitions: BTreeMap<String, u64>,
}

/// Reads the status of `topology` from the cluster at `brokers` and the instances at
/// `instances` (HTTP addresses, as given to `--http`).
pub fn read(
    topology: &Topology,
    brokers: &str,
    instances: &[String],
) -> Result<Status, PipelineError> {
    let group = topology.group_id();
    let topic = &topology.source.topic;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .set(
            "isolation.level",
            match topology.processing.guarantee {
                Guarantee::ExactlyOnce => "read_committed",
                Guarantee::AtLeastOnce => "read_uncommitted",
            },
        )
        .create()
        .map_err(PipelineError::kafka("creating a status client"))?;
    let mut cluster = rdkafka::ClientConfig::new();
    cluster.set("bootstrap.servers", brokers);
    let count = crate::io::sink::partitions_of(&cluster, topic)?
        .ok_or_else(|| PipelineError::Other(format!("the input topic {topic} does not exist")))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .map_err(PipelineError::kafka(format!(
            "reading the committed offsets of group {group}"
        )))?;
    let owners = owners(&consumer, &group, topic)?;
    let scraped: Vec<(InstanceStatus, Metrics)> = instances.iter().map(|a| scrape(a)).collect();
    let mut partitions = Vec::new();
    for p in 0..count {
        let (_, end) =
            consumer
                .fetch_watermarks(topic, p, TIMEOUT)
                .map_err(PipelineError::kafka(format!(
                    "reading the end of {topic}/{p}"
                )))?;
        let committed = committed
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let owner = owners.get(&p).cloned();
        // Gauges: the largest (newest) value over instances, as an earlier owner keeps its
        // last one. Counters: the sum, as each owner counted while it owned the partition.
        let label = p.to_string();
        let value = |name: &str| {
            scraped
                .iter()
                .filter_map(|(_, m)| m.partition(name, topic, &label))
                .reduce(f64::max)
        };
        let total = |name: &str| {
            scraped
                .iter()
                .map(|(_, m)| m.sum_where(name, topic, &label))
                .reduce(|a, b| a + b)
                .map(|v| v as u64)
        };
        partitions.push(PartitionStatus {
            partition: p,
            committed,
            end,
            lag: (end - committed.unwrap_or(0)).max(0),
            owner,
            watermark_ms: value("marquee_watermark_timestamp_seconds").map(|s| (s * 1000.0) as i64),
            watermark_lag_seconds: value("marquee_watermark_lag_seconds"),
            idle: value("marquee_partition_idle").map(|v| v > 0.0),
            late_records: total("marquee_records_late_total"),
            dead_lettered_records: total("marquee_records_dead_lettered_total"),
        });
    }
    Ok(Status {
        topology: topology.name.clone(),
        group,
        topic: topic.clone(),
        partitions,
        instances: scraped.into_iter().map(|(i, _)| i).collect(),
    })
}

/// The owner of each input partition: the group members' assignments, by the instance id in
/// their `client.id` (Marquee sets it to `<instance-id>-input`).
fn owners(
    consumer: &BaseConsumer,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, String>, PipelineError> {
    let groups = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(PipelineError::kafka(format!(
            "describing consumer group {group}"
        )))?;
    let mut owners = BTreeMap::new();
    for member in groups.groups().iter().flat_map(|g| g.members()) {
        let name = member.client_id();
        let name = name.strip_suffix("-input").unwrap_or(name);
        let partitions = member
            .assignment()
            .and_then(|a| assigned_partitions(a, topic))
            .unwrap_or_default();
        for p in partitions {
            owners.insert(p, name.to_string());
        }
    }
    Ok(owners)
}

/// Scrapes one instance: `/readyz` and `/metrics`.
fn scrape(address: &str) -> (InstanceStatus, Metrics) {
    let readyz = get(address, "/readyz");
    let metrics = get(address, "/metrics")
        .map(|(_, page)| Metrics::parse(&page))
        .unwrap_or_default();
    let status = InstanceStatus {
        address: address.to_string(),
        reachable: readyz.is_some(),
        ready: readyz.as_ref().is_some_and(|(code, _)| *code == 200),
        readiness: readyz.map_or_else(
            || "not reachable".to_string(),
            |(_, body)| body.trim().to_string(),
        ),
        state_bytes: metrics
            .matching("marquee_state_store_size_bytes", &[])
            .next()
            .map(|v| v as u64),
        restore_remaining: metrics.per_task("marquee_restore_remaining_records"),
        standby_partitions: metrics.per_task("marquee_standby_partitions"),
    };
    (status, metrics)
}

/// A plain HTTP/1.0 GET: the status code and body, or `None` when the instance does not
/// answer within [`TIMEOUT`].
fn get(address: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = address.to_socket_addrs().ok()?.next()?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

impl Status {
    /// The status as tables for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let lag: i64 = self.partitions.iter().map(|p| p.lag).sum();
        let _ = writeln!(
            out,
            "topology {} · group {} · input {} ({} partitions, {lag} records behind)\n",
            self.topology,
            self.group,
            self.topic,
            self.partitions.len()
        );
        let _ = writeln!(
            out,
            "{:>9}  {:>12}  {:>12}  {:>9}  {:<28}  {:<24}  {:>9}  {:>7}  {:>7}",
            "partition", "committed", "end", "lag", "owner", "watermark", "wm lag", "late", "dead"
        );
        let dash = "-".to_string();
        for p in &self.partitions {
            let watermark = p.watermark_ms.map_or(dash.clone(), |ms| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
                )
                .to_string()
            });
            let wm_lag = match (p.idle, p.watermark_lag_seconds) {
                (Some(true), _) => "idle".to_string(),
                (_, Some(s)) => format!("{s:.0}s"),
                _ => dash.clone(),
            };
            let _ = writeln!(
                out,
                "{:>9}  {:>12}  {:>12}  {:>9}  {:<28}  {:<24}  {:>9}  {:>7}  {:>7}",
                p.partition,
                p.committed.map_or(dash.clone(), |c| c.to_string()),
                p.end,
                p.lag,
                p.owner.clone().unwrap_or_else(|| "(none)".into()),
                watermark,
                wm_lag,
                p.late_records.map_or(dash.clone(), |v| v.to_string()),
                p.dead_lettered_records
                    .map_or(dash.clone(), |v| v.to_string()),
            );
        }
        if !self.instances.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<24}  {:<9}  {:>10}  {:<20}  {:<12}  readiness",
                "instance", "ready", "state", "restoring", "standby"
            );
            for i in &self.instances {
                let restoring: Vec<String> = i
                    .restore_remaining
                    .iter()
                    .filter(|(_, left)| **left > 0)
                    .map(|(task, left)| format!("{task}: {left} left"))
                    .collect();
                let standby: Vec<String> = i
                    .standby_partitions
                    .iter()
                    .map(|(task, n)| format!("{task}: {n}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<24}  {:<9}  {:>10}  {:<20}  {:<12}  {}",
                    i.address,
                    if !i.reachable {
                        "down"
                    } else if i.ready {
                        "yes"
                    } else {
                        "no"
                    },
                    i.state_bytes
                        .map_or(dash.clone(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                    if restoring.is_empty() {
                        "-".to_string()
                    } else {
                        restoring.join(", ")
                    },
                    if standby.is_empty() {
                        "-".to_string()
                    } else {
                        standby.join(", ")
                    },
                    i.readiness.lines().next().unwrap_or_default(),
                );
            }
        }
        out
    }
}
