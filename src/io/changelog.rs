//! Changelog topics: every changelogged store (and the input positions) has a compacted topic,
//! partitioned like the input, that receives each checkpoint's changes as full values
//! (deletions as tombstones). An instance that gains a partition without up-to-date local
//! state rebuilds that partition, and only it, from these topics before processing it.
//!
//! Full values, not merge operands, make the topics idempotent: a record written twice (a
//! replayed checkpoint, an outbox sent again) leaves the same state, and compaction keeps the
//! newest value of each key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::PipelineError;
use crate::io::sink::{ensure_topics, Pending, TopicSpec, COMPACTED};
use crate::metrics;
use crate::progress::Progress;
use crate::state::{Batch, Change, Store, CF_RESUME, POSITIONS};

/// Restored records per RocksDB batch.
const RESTORE_BATCH: usize = 10_000;

/// The changelog topics of one task's stores.
#[derive(Debug, Clone)]
pub struct Changelog {
    /// Each changelogged store (one of [`crate::state::CHANGELOGGED`]) and its topic.
    topics: Vec<(&'static str, String)>,
    /// Client settings of the cluster (admin and restore consumers).
    client: ClientConfig,
    replication_factor: Option<i32>,
    /// Exactly-once: only committed changelog records are restored.
    read_committed: bool,
    /// Longest a restore may go without reading a record before it fails.
    stall_timeout: Duration,
    /// Longest a whole restore may take, and the setting that raises it (named in the error).
    deadline: Option<(Duration, &'static str)>,
}

/// The changelog topic of `store` for consumer group `group`.
pub fn topic_name(group: &str, store: &str) -> String {
    format!("{group}-{store}-changelog")
}

impl Changelog {
    /// The changelogs of `stores` for consumer group `group`, on the cluster `client` reaches.
    pub fn new(
        group: &str,
        stores: &[&'static str],
        client: ClientConfig,
        replication_factor: Option<i32>,
        read_committed: bool,
        stall_timeout: Duration,
        deadline: Option<(Duration, &'static str)>,
    ) -> Self {
        Self {
            topics: stores.iter().map(|s| (*s, topic_name(group, s))).collect(),
            client,
            replication_factor,
            read_committed,
            stall_timeout,
            deadline,
        }
    }

    /// Creates the changelog topics that are missing, with `partitions` (the input's).
    pub fn ensure_topics(&self, partitions: i32) -> Result<(), PipelineError> {
        let specs: Vec<TopicSpec<'_>> = self
            .topics
            .iter()
            .map(|(_, topic)| TopicSpec {
                name: topic,
                partitions: Some(partitions),
                replication_factor: self.replication_factor,
                configs: COMPACTED,
            })
            .collect();
        ensure_topics(&self.client, &specs)
    }

    fn topic(&self, store: &str) -> Option<&str> {
        self.topics
            .iter()
            .find(|(s, _)| *s == store)
            .map(|(_, t)| t.as_str())
    }

    /// The changelog records of `changes`: each key's value in `store` now (committed by the
    /// checkpoint), or a tombstone. Changes of stores without a changelog are skipped.
    pub fn records(
        &self,
        store: &Store,
        changes: &[Change],
    ) -> Result<Vec<Pending>, PipelineError> {
        let values = store.current_values(changes)?;
        Ok(changes
            .iter()
            .zip(values)
            .filter_map(|(change, value)| {
                Some(Pending {
                    topic: self.topic(change.store)?.to_string(),
                    partition: Some(change.partition),
                    key: Some(change.key.clone()),
                    value,
                    timestamp: None,
                    headers: Vec::new(),
                })
            })
            .collect())
    }

    /// Each changelogged store and its topic.
    pub fn topics(&self) -> &[(&'static str, String)] {
        &self.topics
    }

    /// A consumer that reads changelog partitions it is assigned (committed records only
    /// with exactly-once), reporting each partition's end.
    pub fn reader(&self) -> Result<BaseConsumer<RestoreContext>, PipelineError> {
        self.client
            .clone()
            .set("group.id", "marquee-changelog-restore")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set(
                "isolation.level",
                if self.read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create_with_context(RestoreContext)
            .map_err(PipelineError::kafka("creating a changelog consumer"))
    }

    /// Rebuilds `partitions` of every changelogged store from the topics, each read to its
    /// end: a partition with a standby copy (see `crate::runtime::standby`) from where the
    /// copy has read to, any other from the start after its local entries are dropped.
    /// Progress goes to the log, to metrics and to `progress` (shown by `/readyz`). Returns
    /// the records read.
    pub fn restore(
        &self,
        store: &Store,
        task: &'static str,
        partitions: &[i32],
        mut progress: impl FnMut(&str),
    ) -> Result<u64, PipelineError> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let stores: Vec<&str> = self.topics.iter().map(|(s, _)| *s).collect();
        let mut clear = Batch::default();
        let mut warm = BTreeMap::new();
        for &p in partitions {
            match store.standby_offsets(task, p)? {
                Some(offsets) => {
                    warm.insert(p, offsets);
                }
                None => store.stage_partition_clear(&mut clear, task, p, &stores),
            }
        }
        store.commit(clear)?;
        let start = |s: &str, p: i32| match warm.get(&p) {
            Some(offsets) => offsets
                .iter()
                .find(|(store, _)| *store == s)
                .map_or(Offset::Beginning, |(_, o)| Offset::Offset(*o)),
            None => Offset::Beginning,
        };
        let consumer = self.reader()?;
        // What each topic partition holds now, for progress only: the restore itself reads
        // until the consumer reports the partition's end.
        let mut ends: Vec<(&'static str, &str, BTreeMap<i32, i64>)> = Vec::new();
        for (s, topic) in &self.topics {
            let mut held = BTreeMap::new();
            for &p in partitions {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((low, high)) => {
                        let from = match start(s, p) {
                            Offset::Offset(o) => o.max(low),
                            _ => low,
                        };
                        if high > from {
                            held.insert(p, high - from);
                        }
                    }
                    // Unknown (a broker restarting): read it to its end all the same; only
                    // the progress figures miss it.
                    Err(error) => {
                        tracing::warn!(topic, partition = p, %error, "changelog end unknown; reading it to its end");
                        held.insert(p, 0);
                    }
                }
            }
            ends.push((s, topic, held));
        }
        let total: i64 = ends.iter().flat_map(|(_, _, h)| h.values()).sum();
        tracing::info!(
            task,
            ?partitions,
            standby_copies = ?warm.keys().collect::<Vec<_>>(),
            records = total,
            "restoring state from the changelog topics"
        );
        let (mut read, mut batch) = (0u64, Batch::default());
        let mut report = Progress::new(
            format!("restoring partitions {partitions:?}"),
            "changelog records",
            Some(total.max(0) as u64),
        );
        // One topic at a time: a partition's end is reported by partition number only.
        // The positions first: an earlier owner still writing (a broker that let members
        // overlap) can then only leave the stores ahead of them, which a replay onto
        // idempotent values absorbs, never behind them, which would skip records for good.
        ends.sort_by_key(|(s, _, _)| *s != POSITIONS);
        for (s, topic, mut left) in ends {
            let mut tpl = TopicPartitionList::new();
            for &p in left.keys() {
                tpl.add_partition_offset(topic, p, start(s, p))
                    .map_err(PipelineError::kafka("assigning a changelog partition"))?;
            }
            consumer
                .assign(&tpl)
                .map_err(PipelineError::kafka("assigning the changelog partitions"))?;
            let mut last_progress = Instant::now();
            while !left.is_empty() {
                if let Some(line) = report.due(read) {
                    metrics::restore_remaining(task, (total - read as i64).max(0));
                    tracing::info!(task, "{line}");
                    progress(&line);
                }
                if last_progress.elapsed() > self.stall_timeout {
                    let waiting: Vec<String> = left.keys().map(|p| p.to_string()).collect();
                    return Err(PipelineError::Other(format!(
                        "restoring state from {topic} made no progress for {} (partitions {} \
                         not at their end; are the brokers reachable? an open transaction of a \
                         crashed instance holds read_committed readers until its \
                         transaction.timeout.ms)",
                        humantime::format_duration(self.stall_timeout),
                        waiting.join(", ")
                    )));
                }
                if let Some((limit, setting)) = self.deadline {
                    if started.elapsed() > limit {
                        let waiting: Vec<String> = left.keys().map(|p| p.to_string()).collect();
                        return Err(PipelineError::Other(format!(
                            "restoring state from {topic} did not finish within {} (partitions \
                             {} not at their end); check the brokers or raise {setting}",
                            humantime::format_duration(limit),
                            waiting.join(", ")
                        )));
                    }
                }
                let message = match consumer.poll(Duration::from_millis(100)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        left.remove(&p);
                        last_progress = Instant::now();
                        continue;
                    }
                    // A broker restarting is retried by librdkafka (the stall limit bounds it).
                    Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                        return Err(PipelineError::kafka(format!("reading changelog {topic}"))(
                            e,
                        ))
                    }
                    Some(Err(e)) => {
                        tracing::warn!(topic, error = %e, "changelog read error; librdkafka retries");
                        continue;
                    }
                    Some(Ok(m)) => m,
                };
                last_progress = Instant::now();
                let Some(key) = message.key() else {
                    tracing::warn!(
                        topic,
                        partition = message.partition(),
                        offset = message.offset(),
                        "a changelog record without a key; skipped"
                    );
                    continue;
                };
                store.stage_restored(&mut batch, s, key, message.payload());
                read += 1;
                if batch.len() >= RESTORE_BATCH {
                    store.commit(std::mem::take(&mut batch))?;
                }
            }
        }
        for &p in warm.keys() {
            store.stage_standby_end(&mut batch, task, p);
        }
        store.commit(batch)?;
        if stores.contains(&CF_RESUME) {
            for &p in partitions {
                store.rebuild_recent_index(p)?;
            }
        }
        metrics::restore_remaining(task, 0);
        metrics::restored(task, read, started.elapsed());
        tracing::info!(
            task,
            ?partitions,
            records = read,
            seconds = started.elapsed().as_secs_f64(),
            "state restored from the changelog topics"
        );
        Ok(read)
    }
}

/// The restore consumer's context: reaching a partition's end is how a restore finishes, not
/// an error worth logging.
pub struct RestoreContext;

impl rdkafka::ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        crate::io::source::log_consumer_error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}
