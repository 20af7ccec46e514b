//! The consumer side: a consumer-group member on the input topic, its rebalance events, pause
//! and resume for watermark alignment, and offset commits.
//!
//! The state store, not Kafka, is the source of truth for offsets: records below a partition's
//! checkpointed offset are skipped, and the Kafka commit (written after each checkpoint) only
//! lets lag monitoring and a new instance start near the right place.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
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
    /// Events are waiting: checked on every poll without taking the lock.
    pending: AtomicBool,
    /// The consumer is closing: revoked partitions are released at once (nothing is left to
    /// checkpoint, and the close waits for them).
    closing: AtomicBool,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_consumer_error(error, reason);
    }
}

/// Logs a consumer's client error, except reaching a partition's end: that is how Marquee
/// learns that a partition is caught up, not a problem.
pub fn log_consumer_error(error: KafkaError, reason: &str) {
    let end = matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    );
    if !end {
        tracing::error!(%error, reason, "Kafka consumer error");
    }
}

impl ConsumerContext for SourceContext {
    /// Assigned partitions are taken at once; revoked ones are kept until the pipeline has
    /// checkpointed them and calls [`Source::release`]. The group waits for that release
    /// before it gives them to another member, so the new owner always starts from this
    /// member's last checkpoint: its offsets, outputs and changelog values are committed
    /// (exactly-once) before anyone else reads them.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.push(Assignment::Assigned(partitions(tpl)));
                result
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if !self.closing.load(Ordering::Acquire) =>
            {
                self.push(Assignment::Revoked(partitions(tpl)));
                Ok(())
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => release(consumer, tpl),
            other => {
                tracing::error!(error = %RDKafkaErrorCode::from(other), "consumer group rebalance failed");
                // librdkafka expects the assignment dropped on a rebalance error.
                release(consumer, tpl)
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "applying a consumer group rebalance failed");
        }
    }
}

/// Gives up `tpl` (the whole assignment with the eager protocol).
fn release<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    if matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        consumer.incremental_unassign(tpl)
    } else {
        consumer.unassign()
    }
}

impl SourceContext {
    fn push(&self, event: Assignment) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        self.pending.store(true, Ordering::Release);
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Logs a consumer error that librdkafka retries; a fatal one (the consumer is dead, such as
/// when another process joined with the same static member id) becomes an error that stops
/// the instance, so its supervisor starts it afresh.
pub fn retriable(error: KafkaError) -> Result<(), PipelineError> {
    if let KafkaError::MessageConsumptionFatal(code) = error {
        return Err(PipelineError::Other(format!(
            "the consumer failed for good ({code}): another running instance has the same \
             --instance-id (group.instance.id), or this one was fenced after its session timed \
             out; stopping so that the supervisor starts the instance afresh"
        )));
    }
    tracing::warn!(%error, "consumer error; librdkafka retries");
    Ok(())
}

/// The partitions of `topic` in a consumer-protocol member assignment (a version, then each
/// topic with its partitions; later fields are ignored); `None` when it is malformed.
pub fn assigned_partitions(assignment: &[u8], topic: &str) -> Option<Vec<i32>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = tail;
        Some(head)
    }
    fn int32(bytes: &mut &[u8]) -> Option<i32> {
        Some(i32::from_be_bytes(take(bytes, 4)?.try_into().ok()?))
    }
    let mut rest = assignment;
    take(&mut rest, 2)?; // version
    let mut partitions = Vec::new();
    for _ in 0..int32(&mut rest)?.max(0) {
        let len = i16::from_be_bytes(take(&mut rest, 2)?.try_into().ok()?);
        let name = take(&mut rest, usize::try_from(len).ok()?)?;
        let count = int32(&mut rest)?.max(0);
        for _ in 0..count {
            let p = int32(&mut rest)?;
            if name == topic.as_bytes() {
                partitions.push(p);
            }
        }
    }
    Some(partitions)
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
        .set("queued.min.messages", "20000")
        // Cooperative rebalancing: a partition that stays keeps running through a rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (k, v) in overrides {
        config.set(k, v);
    }
    config
}

/// The input topic's consumer.
pub struct Source {
    consumer: BaseConsumer<SourceContext>,
    topic: String,
    /// The group and this member's `client.id`, by which it finds itself among the members.
    group: String,
    client_id: String,
}

/// A member of the consumer group, as its coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub client_id: String,
    /// The input partitions assigned to it.
    pub partitions: Vec<i32>,
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
            group: config.get("group.id").unwrap_or_default().to_string(),
            client_id: config.get("client.id").unwrap_or("rdkafka").to_string(),
        })
    }

    /// This member's `client.id`.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The group's members and their input partitions, or `None` while the group is
    /// rebalancing (its assignments are then in flux).
    pub fn members(&self) -> Result<Option<Vec<Member>>, PipelineError> {
        let groups = self
            .consumer
            .fetch_group_list(Some(&self.group), Duration::from_secs(2))
            .map_err(PipelineError::kafka(format!(
                "describing consumer group {}",
                self.group
            )))?;
        let Some(group) = groups.groups().iter().find(|g| g.name() == self.group) else {
            return Ok(None);
        };
        if group.state() != "Stable" {
            return Ok(None);
        }
        let members = group
            .members()
            .iter()
            .map(|m| Member {
                client_id: m.client_id().to_string(),
                partitions: m
                    .assignment()
                    .and_then(|a| assigned_partitions(a, &self.topic))
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Some(members))
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

    /// Whether rebalance events wait for [`Source::take_assignments`].
    pub fn assignments_changed(&self) -> bool {
        self.consumer.context().pending.load(Ordering::Acquire)
    }

    /// Rebalance events since the last call.
    pub fn take_assignments(&self) -> Vec<Assignment> {
        self.consumer
            .context()
            .pending
            .store(false, Ordering::Release);
        std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Gives up revoked `partitions` once they are checkpointed; the group's rebalance
    /// continues only then.
    pub fn release(&self, partitions: &[i32]) -> Result<(), PipelineError> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        release(&self.consumer, &tpl).map_err(PipelineError::kafka(format!(
            "releasing revoked partitions {partitions:?}"
        )))
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

    /// Moves the fetch position of `partition` to `offset`; records fetched before are dropped.
    pub fn seek(&self, partition: i32, offset: Offset) -> Result<(), PipelineError> {
        self.consumer
            .seek(&self.topic, partition, offset, Duration::from_secs(10))
            .map_err(PipelineError::kafka(format!(
                "seeking partition {partition} to {offset:?}"
            )))
    }

    /// The broker's high watermark of `partition` as of the last fetch response (no round trip).
    pub fn cached_high_watermark(&self, partition: i32) -> Option<i64> {
        let topic = CString::new(self.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer lives as long as `self.consumer`; the topic is a valid C
        // string for the call and the out-parameters are plain integers.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then_some(high)
    }

    /// The partitions of the input topic assigned to this member now.
    pub fn assignment(&self) -> Result<Vec<i32>, PipelineError> {
        let tpl = self
            .consumer
            .assignment()
            .map_err(PipelineError::kafka("reading the assignment"))?;
        Ok(tpl.elements().iter().map(|e| e.partition()).collect())
    }

    /// The group's committed offsets of `partitions` (those that have one).
    pub fn committed(&self, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, PipelineError> {
        Ok(self
            .committed_entries(partitions)?
            .into_iter()
            .map(|(p, offset, _)| (p, offset))
            .collect())
    }

    /// The metadata the group last committed with each of `partitions` (those that have
    /// a committed offset).
    pub fn committed_metadata(
        &self,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, String>, PipelineError> {
        Ok(self
            .committed_entries(partitions)?
            .into_iter()
            .map(|(p, _, metadata)| (p, metadata))
            .collect())
    }

    /// Each of `partitions` that has a committed offset: the offset and its metadata.
    fn committed_entries(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<(i32, i64, String)>, PipelineError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(30))
            .map_err(PipelineError::kafka(format!(
                "reading the committed offsets of {}",
                self.topic
            )))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o, e.metadata().to_string())),
                _ => None,
            })
            .collect())
    }

    /// The consumer group's metadata, for offsets sent in a transaction.
    pub fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// `offsets` (next offsets) of the input topic as a partition list.
    pub fn offset_list(&self, offsets: &[(i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &(partition, next) in offsets {
            let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next));
        }
        tpl
    }

    /// `offsets` (next offsets) with each partition's commit metadata.
    pub fn offset_list_with_metadata(&self, offsets: &[(i32, i64, String)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (partition, next, metadata) in offsets {
            let _ = tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(*next));
            if let Some(mut element) = tpl.find_partition(&self.topic, *partition) {
                element.set_metadata(metadata.as_str());
            }
        }
        tpl
    }

    /// Commits next offsets asynchronously (for lag monitoring and new group members).
    pub fn commit(&self, offsets: impl IntoIterator<Item = (i32, i64)>) {
        let offsets: Vec<_> = offsets.into_iter().collect();
        let tpl = self.offset_list(&offsets);
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "offset commit failed; it is retried at the next checkpoint");
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // The consumer's close revokes what is still assigned and waits for the release.
        self.consumer
            .context()
            .closing
            .store(true, Ordering::Release);
    }
}

/// First distance a skipped position is sought back by; it grows fourfold per attempt.
const SEEK_BACK_FIRST: i64 = 1024;

/// Checks that a partition whose fetch position moved (assignment, resume after an alignment
/// pause) continues exactly at the next offset Marquee needs.
///
/// Some brokers cannot serve a fetch that starts inside a record batch: Tansu 0.6 answers with
/// the next batch (or nothing), so the records after the position are silently skipped. When
/// the first record lies past the target, or nothing arrives although the broker holds more,
/// the partition is sought back further and further until the broker serves a record at or
/// before the target; the caller skips the records before it. A legitimate gap (compaction,
/// transaction markers) ends the search at the first step; offsets deleted by retention are
/// reported once the search has reached offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reposition {
    /// The offset the partition must continue at.
    pub target: i64,
    /// How far before `target` the last seek went (`None`: no seek yet).
    back: Option<i64>,
    /// When the position last moved, to notice a partition that delivers nothing.
    since: Instant,
}

/// What the first record (or the silence) after a position change means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// At or before the target: the stream is continuous from here.
    Continuous,
    /// Past the target: seek to this offset and look again.
    SeekBack(i64),
    /// Past the target even when read from offset 0: these records are not on the broker.
    Missing,
}

impl Reposition {
    /// Expects the partition to continue at `target`.
    pub fn new(target: i64, now: Instant) -> Self {
        Self {
            target,
            back: None,
            since: now,
        }
    }

    /// The first record after the position change is at `offset`.
    pub fn landed(&mut self, offset: i64, now: Instant) -> Landing {
        if offset <= self.target {
            return Landing::Continuous;
        }
        self.step_back(now)
    }

    /// Nothing arrived since the position changed; `high_watermark` is what the broker holds.
    /// Returns a seek when the broker holds records at or after the target but served none of
    /// them for `patience`.
    pub fn silent(
        &mut self,
        high_watermark: Option<i64>,
        patience: Duration,
        now: Instant,
    ) -> Option<Landing> {
        let waiting = now.saturating_duration_since(self.since) >= patience;
        (waiting && high_watermark.is_some_and(|h| h > self.target)).then(|| self.step_back(now))
    }

    fn step_back(&mut self, now: Instant) -> Landing {
        if self.back.is_some_and(|b| b >= self.target) {
            return Landing::Missing;
        }
        let back = self
            .back
            .map_or(SEEK_BACK_FIRST, |b| b.saturating_mul(4))
            .min(self.target);
        self.back = Some(back);
        self.since = now;
        Landing::SeekBack(self.target - back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer-protocol assignment of `topics`, as the group leader writes it.
    fn assignment(version: i16, topics: &[(&str, &[i32])], user_data: &[u8]) -> Vec<u8> {
        let mut bytes = version.to_be_bytes().to_vec();
        bytes.extend((topics.len() as i32).to_be_bytes());
        for (name, partitions) in topics {
            bytes.extend((name.len() as i16).to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend((partitions.len() as i32).to_be_bytes());
            for p in *partitions {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((user_data.len() as i32).to_be_bytes());
        bytes.extend(user_data);
        bytes
    }

    #[test]
    fn an_assignment_yields_the_partitions_of_its_topic_only() {
        let bytes = assignment(3, &[("other", &[0, 1]), ("plays", &[4, 2])], b"sticky");
        assert_eq!(assigned_partitions(&bytes, "plays"), Some(vec![4, 2]));
        assert_eq!(assigned_partitions(&bytes, "absent"), Some(vec![]));
        assert_eq!(
            assigned_partitions(&assignment(0, &[], b""), "plays"),
            Some(vec![])
        );
    }

    #[test]
    fn a_truncated_assignment_is_malformed_not_a_panic() {
        let bytes = assignment(1, &[("plays", &[0, 1, 2])], b"");
        for cut in 0..bytes.len() - 4 {
            assert_eq!(
                assigned_partitions(&bytes[..cut], "plays"),
                None,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_record_at_or_before_the_target_is_continuous() {
        let now = Instant::now();
        assert_eq!(
            Reposition::new(50, now).landed(50, now),
            Landing::Continuous
        );
        assert_eq!(Reposition::new(50, now).landed(3, now), Landing::Continuous);
    }

    #[test]
    fn a_skip_seeks_back_further_each_time_until_offset_zero() {
        let now = Instant::now();
        let mut r = Reposition::new(10_000, now);
        assert_eq!(r.landed(10_500, now), Landing::SeekBack(10_000 - 1024));
        assert_eq!(r.landed(10_500, now), Landing::SeekBack(10_000 - 4096));
        assert_eq!(r.landed(10_500, now), Landing::SeekBack(0));
        assert_eq!(r.landed(10_500, now), Landing::Missing);
        assert_eq!(r.landed(9_000, now), Landing::Continuous);
    }

    #[test]
    fn silence_seeks_back_only_when_the_broker_holds_more() {
        let now = Instant::now();
        let patience = Duration::from_secs(1);
        let mut r = Reposition::new(100, now);
        let later = now + Duration::from_secs(2);
        assert_eq!(r.silent(Some(200), patience, now), None, "not yet");
        assert_eq!(r.silent(Some(100), patience, later), None, "caught up");
        assert_eq!(r.silent(None, patience, later), None, "unknown");
        assert_eq!(
            r.silent(Some(200), patience, later),
            Some(Landing::SeekBack(0))
        );
        assert_eq!(
            r.silent(Some(200), patience, later),
            None,
            "the seek restarted the wait"
        );
    }
}
