//! The consumer side: a consumer-group member on the input topic, its rebalance events, pause
//! and resume for watermark alignment, and offset commits.
//!
//! The state store, not Kafka, is the source of truth for offsets: records below a partition's
//! checkpointed offset are skipped, and the Kafka commit (written after each checkpoint) only
//! lets lag monitoring and a new instance start near the right place.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::error::PipelineError;

/// A change of the partitions this instance owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Collects rebalance events; they are handled by the pipeline after `poll` returns.
#[derive(Default)]
pub struct SourceContext {
    events: Mutex<Vec<Assignment>>,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.push(Assignment::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.push(Assignment::Assigned(partitions(tpl)));
        }
    }
}

impl SourceContext {
    fn push(&self, event: Assignment) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Consumer defaults, tuned for throughput with bounded memory. Topology `source.kafka` wins.
pub fn consumer_config(
    brokers: &str,
    group_id: &str,
    overrides: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Short broker waits and backoff: brokers such as Tansu sleep up to fetch.wait.max.ms
        // after every fetch, which caps a consumer at a fraction of its CPU-bound rate.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "1")
        // Bound the prefetch queue so a backlog cannot run the process out of memory.
        .set("queued.max.messages.kbytes", "65536")
        .set("queued.min.messages", "20000");
    for (k, v) in overrides {
        config.set(k, v);
    }
    config
}

/// The input topic's consumer.
pub struct Source {
    consumer: BaseConsumer<SourceContext>,
    topic: String,
}

impl Source {
    /// Joins the consumer group and subscribes to `topic`.
    pub fn subscribe(config: &ClientConfig, topic: &str) -> Result<Self, PipelineError> {
        let consumer: BaseConsumer<SourceContext> = config
            .create_with_context(SourceContext::default())
            .map_err(PipelineError::kafka("creating the consumer"))?;
        consumer
            .subscribe(&[topic])
            .map_err(PipelineError::kafka(format!("subscribing to {topic}")))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
        })
    }

    /// The input topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Number of partitions of the input topic, from the cluster's metadata.
    pub fn partition_count(&self) -> Result<i32, PipelineError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(PipelineError::kafka(format!(
                "reading metadata of {}",
                self.topic
            )))?;
        Ok(metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32))
    }

    /// The next record, or `None` after `timeout` without one.
    pub fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        self.consumer.poll(timeout)
    }

    /// Rebalance events since the last call.
    pub fn take_assignments(&self) -> Vec<Assignment> {
        std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Stops (`true`) or restarts fetching `partition`.
    pub fn set_paused(&self, partition: i32, paused: bool) -> Result<(), PipelineError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        let result = if paused {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        result.map_err(PipelineError::kafka(format!(
            "pausing/resuming partition {partition}"
        )))
    }

    /// Commits next offsets asynchronously (for lag monitoring and new group members).
    pub fn commit(&self, offsets: impl IntoIterator<Item = (i32, i64)>) {
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in offsets {
            let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next));
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "offset commit failed; it is retried at the next checkpoint");
            }
        }
    }
}
