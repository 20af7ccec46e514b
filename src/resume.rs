//! The resume-position table, end to end: repartition by profile, apply events to the table
//! in RocksDB, publish rate-limited updates and tombstones to a compacted topic, restore a new
//! machine's table from that topic, and answer queries for the partitions owned here.
//!
//! ```text
//! input (by session) ─► repartition ─► <name>-resume-by-profile ─► table ─► resume-positions
//!                        (decode,        (key profile_id, partition    (RocksDB)   (compacted, same
//!                         dead letters)   = hash(profile) mod N)                    partitioning)
//! ```
//!
//! The table's partitions are the repartition topic's, and the output topic uses the same
//! partitioning, so partition p of the table is rebuilt from partition p of the output topic
//! and a query for a profile is answered by whoever owns `hash(profile) mod N`.
//!
//! Applying an event is idempotent and order-independent (see [`crate::table`]), so both hops
//! are at-least-once without duplicates in effect. Offsets are committed to Kafka only once
//! every update before them has been published (they lag by the emit interval): a new machine
//! that restores from the topic and continues from those offsets misses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rocksdb::WriteBatch;
use tokio_util::sync::CancellationToken;

use crate::check::check;
use crate::config::{ResumeConfig, Topology};
use crate::decode::{split_frame, Decoder};
use crate::error::PipelineError;
use crate::gen::partition_for;
use crate::http::Health;
use crate::record::{Origin, ResumePosition};
use crate::sink::{send_with_backpressure, DeliveryTracker, Sink};
use crate::source::{consumer_config, Assignment, Source};
use crate::state::{PartitionMeta, Store, StoredEntry};
use crate::table::{apply, Applied, Entry};

/// The resume schema.
pub const RESUME_POSITION_SCHEMA: &str = include_str!("../avro/resume_position.avsc");
/// Header carrying the event id that orders ties, so a restored table breaks them the same way.
pub const EVENT_ID_HEADER: &str = "marquee.event_id";
/// How often a running restore reports its progress.
const RESTORE_REPORT: Duration = Duration::from_secs(5);
/// Name of the table stage's offsets in the meta column family.
const STAGE: &str = "resume";

/// What the HTTP side may read: the store and which table partitions this instance owns.
pub struct TableView {
    pub store: Arc<Store>,
    /// Number of table partitions (of the repartition and output topics).
    pub partitions: i32,
    owned: RwLock<BTreeSet<i32>>,
    /// Caps the queries answered at once (see `crate::http`).
    pub queries: tokio::sync::Semaphore,
}

impl TableView {
    /// A view of `store` for a table of `partitions` partitions, none owned yet.
    pub fn new(store: Arc<Store>, partitions: i32) -> Self {
        Self {
            store,
            partitions,
            owned: RwLock::new(BTreeSet::new()),
            queries: tokio::sync::Semaphore::new(crate::http::MAX_CONCURRENT_QUERIES),
        }
    }

    /// The table partition of `profile`.
    pub fn partition_of(&self, profile: &str) -> i32 {
        partition_for(profile, self.partitions)
    }

    /// Whether this instance owns (and has restored) `partition`.
    pub fn owns(&self, partition: i32) -> bool {
        self.owned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&partition)
    }

    /// Marks `partition` owned without a consumer group (the query benchmark).
    pub fn set_owned_for_bench(&self, partition: i32) {
        self.set_owned(partition, true);
    }

    fn set_owned(&self, partition: i32, owned: bool) {
        let mut set = self.owned.write().unwrap_or_else(|e| e.into_inner());
        if owned {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }
}

/// Reads the input, keyed by session, and re-publishes each record unchanged keyed by its
/// profile to the partition that owns the profile's table entries.
pub fn repartition(
    topology: &Topology,
    resume: &ResumeConfig,
    brokers: &str,
    mut decoder: Decoder,
    dead_letters: Sink,
    producer: ThreadedProducer<DeliveryTracker>,
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    let consumer = consumer_config(
        brokers,
        &format!("{}-repartition", topology.group_id()),
        &topology.source.kafka,
    );
    let source = Source::subscribe(&consumer, &topology.source.topic)?;
    let target = resume.repartition_topic(&topology.name);
    let max_future_skew = topology.time.max_future_skew.as_millis() as i64;
    let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    while !shutdown.is_cancelled() {
        let polled = source.poll(Duration::from_millis(50));
        // Nothing here is per partition, so assignment changes need no handling.
        source.take_assignments();
        if let Some(Err(e)) = &polled {
            tracing::warn!(error = %e, "consumer error; librdkafka retries");
        }
        if let Some(Ok(m)) = polled {
            let origin = Origin {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
            };
            let checked = decoder
                .decode(m.key(), m.payload())?
                .and_then(|e| check(&e, origin.timestamp, max_future_skew).map(|()| e));
            match checked {
                Ok(event) => {
                    let mut record = BaseRecord::to(&target)
                        .key(event.profile_id.as_bytes())
                        .partition(partition_for(&event.profile_id, resume.partitions))
                        .payload(m.payload().unwrap_or_default());
                    if let Some(ts) = origin.timestamp {
                        record = record.timestamp(ts);
                    }
                    send_with_backpressure(&producer, record)?;
                }
                Err(e) => dead_letters.send_dead_letter(m.key(), m.payload(), origin, &e)?,
            }
            offsets.insert(origin.partition, origin.offset + 1);
        }
        if last_commit.elapsed() >= topology.state.checkpoint_interval {
            dead_letters.flush_also(&producer)?;
            source.commit(std::mem::take(&mut offsets));
            last_commit = Instant::now();
        }
    }
    dead_letters.flush_also(&producer)?;
    source.commit(offsets);
    Ok(())
}

/// Rebuilds the table from the compacted output topic when this state directory has never
/// held it (a new machine); a directory that has it is left alone.
pub fn restore(
    store: &Store,
    brokers: &str,
    resume: &ResumeConfig,
    decoder_registry: &dyn crate::registry::SchemaRegistry,
) -> Result<u64, PipelineError> {
    if store.table_restored()? {
        return Ok(0);
    }
    let started = Instant::now();
    let consumer: BaseConsumer<RestoreContext> =
        consumer_config(brokers, "marquee-restore", &Default::default())
            .set("enable.partition.eof", "true")
            .create_with_context(RestoreContext)
            .map_err(PipelineError::kafka("creating the restore consumer"))?;
    let schema = apache_avro::Schema::parse_str(RESUME_POSITION_SCHEMA)
        .expect("avro/resume_position.avsc is valid");
    let mut writers: HashMap<u32, apache_avro::Schema> = HashMap::new();
    let mut restored = 0u64;
    let metadata = consumer
        .fetch_metadata(Some(&resume.topic), Duration::from_secs(10))
        .map_err(PipelineError::kafka(format!(
            "reading metadata of {}",
            resume.topic
        )))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    // Every partition is read until the consumer reaches its end (partition EOF: the position
    // is at the broker's high watermark, at least the end when the restore began), within
    // `restore_timeout`. The end offsets asked for now only measure progress: those Tansu 0.6
    // reports fall short of the high watermark (a restore that stopped there missed entries).
    let mut tpl = TopicPartitionList::new();
    let mut ends: BTreeMap<i32, Option<i64>> = BTreeMap::new();
    for &p in &partitions {
        let end = consumer
            .fetch_watermarks(&resume.topic, p, Duration::from_secs(10))
            .ok()
            .and_then(|(_, high)| (high > 0).then_some(high));
        ends.insert(p, end);
        tpl.add_partition_offset(&resume.topic, p, Offset::Beginning)
            .map_err(PipelineError::kafka("assigning a restore partition"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(PipelineError::kafka("assigning the restore partitions"))?;
    let mut positions: BTreeMap<i32, i64> = ends.keys().map(|&p| (p, 0)).collect();
    let remaining_records = |ends: &BTreeMap<i32, Option<i64>>, positions: &BTreeMap<i32, i64>| {
        ends.iter()
            .filter_map(|(p, end)| end.map(|end| (end - positions[p]).max(0)))
            .sum::<i64>()
    };
    // The newest version of each key read since the last commit: a store batch takes one
    // write per entry (see `Store::stage_table_put`), and older versions need no write.
    let mut staged: HashMap<(i32, String, String), Option<StoredEntry>> = HashMap::new();
    let mut last_report = Instant::now();
    while !ends.is_empty() {
        if last_report.elapsed() >= RESTORE_REPORT {
            let left = remaining_records(&ends, &positions);
            crate::metrics::table_restore_remaining(left);
            tracing::info!(restored, records_left = left, partitions_left = ends.len(), topic = %resume.topic, "restoring the resume table");
            last_report = Instant::now();
        }
        if started.elapsed() > resume.restore_timeout {
            let behind: Vec<String> = ends
                .iter()
                .map(|(p, end)| {
                    let end = end.map_or("its end".into(), |e| e.to_string());
                    format!("partition {p} at offset {} of {end}", positions[p])
                })
                .collect();
            return Err(PipelineError::Other(format!(
                "restoring the resume table from {} did not finish within {} ({}); \
                 check the brokers or raise resume.restore_timeout",
                resume.topic,
                humantime::format_duration(resume.restore_timeout),
                behind.join(", ")
            )));
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                // The consumer is at the partition's current end, past the one taken above.
                ends.remove(&p);
                continue;
            }
            Some(Err(e)) => return Err(PipelineError::kafka("reading the resume topic")(e)),
            Some(Ok(m)) => m,
        };
        let (p, offset) = (m.partition(), m.offset());
        positions.insert(p, offset + 1);
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let Some((profile, title)) = crate::record::split_resume_key(&key) else {
            tracing::warn!(
                partition = p,
                offset = m.offset(),
                key,
                "not a resume key; skipped"
            );
            continue;
        };
        let (profile, title) = (profile.as_str(), title.as_str());
        match m.payload() {
            None => {
                staged.insert((p, profile.to_string(), title.to_string()), None);
            }
            Some(value) => {
                let position = decode_position(value, &schema, &mut writers, decoder_registry)?;
                let event_id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == EVENT_ID_HEADER)
                            .and_then(|h| h.value)
                    })
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let stored = StoredEntry {
                    entry: Entry { position, event_id },
                    pending: false,
                };
                staged.insert((p, profile.to_string(), title.to_string()), Some(stored));
            }
        }
        restored += 1;
        if staged.len() >= 10_000 {
            commit_restored(store, &mut staged, false)?;
        }
    }
    commit_restored(store, &mut staged, true)?;
    crate::metrics::table_restore_remaining(0);
    crate::metrics::table_restored(restored, started.elapsed());
    tracing::info!(records = restored, seconds = started.elapsed().as_secs_f64(), topic = %resume.topic, "resume table restored");
    Ok(restored)
}

/// Writes the `staged` entries (and the restored marker when `complete`) in one batch.
fn commit_restored(
    store: &Store,
    staged: &mut HashMap<(i32, String, String), Option<StoredEntry>>,
    complete: bool,
) -> Result<(), PipelineError> {
    let mut batch = WriteBatch::default();
    for ((p, profile, title), stored) in staged.drain() {
        match stored {
            Some(stored) => store.stage_table_put(&mut batch, p, &stored)?,
            None => store.stage_table_delete(&mut batch, p, &profile, &title)?,
        }
    }
    if complete {
        store.stage_table_restored(&mut batch);
    }
    Ok(store.commit(batch)?)
}

/// The restore consumer's context: reaching a partition's end is how a restore finishes, not
/// an error worth logging.
struct RestoreContext;

impl rdkafka::ClientContext for RestoreContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::source::log_consumer_error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

fn decode_position(
    value: &[u8],
    reader: &apache_avro::Schema,
    writers: &mut HashMap<u32, apache_avro::Schema>,
    registry: &dyn crate::registry::SchemaRegistry,
) -> Result<ResumePosition, PipelineError> {
    let corrupt = |m: String| {
        PipelineError::Other(format!(
            "resume topic holds a record that is not a ResumePosition: {m}"
        ))
    };
    let (id, mut payload) = split_frame(value).map_err(|e| corrupt(e.to_string()))?;
    if let std::collections::hash_map::Entry::Vacant(slot) = writers.entry(id) {
        let text = registry.schema_by_id(id)?;
        slot.insert(apache_avro::Schema::parse_str(&text).map_err(|e| corrupt(e.to_string()))?);
    }
    let resolver = apache_avro::reader::datum::GenericDatumReader::builder(&writers[&id])
        .reader_schema(reader)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
    let v = resolver
        .read_value(&mut payload)
        .map_err(|e| corrupt(e.to_string()))?;
    apache_avro::from_value(&v).map_err(|e| corrupt(e.to_string()))
}

/// One owned table partition.
struct TablePartition {
    next_offset: Option<i64>,
    max_event_time: Option<i64>,
}

/// Applies events to the table and publishes its changes.
pub struct TableStage {
    decoder: Decoder,
    sink: Sink,
    store: Arc<Store>,
    view: Arc<TableView>,
    resume: ResumeConfig,
    checkpoint_interval: Duration,
    /// The clock-skew guard's bound: a far-future event would become the retention clock.
    max_future_skew_ms: i64,
    parts: BTreeMap<i32, TablePartition>,
    /// Entries changed since the last checkpoint, by key.
    dirty: HashMap<String, (i32, StoredEntry)>,
    /// Changed entries whose output record is owed, by key, with their partition.
    pending: BTreeMap<String, i32>,
    /// When each recently emitted key was last emitted (the rate limit).
    last_emit: HashMap<String, Instant>,
    /// Offsets per checkpoint, committed to Kafka once everything before them is published.
    commits: VecDeque<(Instant, Vec<(i32, i64)>)>,
    last_retention_scan: Instant,
    health: Arc<Health>,
}

impl TableStage {
    /// Subscribes to the table's input topic (the repartition topic, or the input when it is
    /// already keyed by profile) and re-queues output owed from before a restart.
    pub fn new(
        topology: &Topology,
        resume: &ResumeConfig,
        decoder: Decoder,
        sink: Sink,
        view: Arc<TableView>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            decoder,
            sink,
            store: Arc::clone(&view.store),
            view,
            resume: resume.clone(),
            checkpoint_interval: topology.state.checkpoint_interval,
            max_future_skew_ms: topology.time.max_future_skew.as_millis() as i64,
            parts: BTreeMap::new(),
            dirty: HashMap::new(),
            pending: BTreeMap::new(),
            last_emit: HashMap::new(),
            commits: VecDeque::new(),
            last_retention_scan: Instant::now(),
            health,
        }
    }

    /// Runs until `shutdown`, then publishes everything owed and checkpoints.
    pub fn run(
        mut self,
        source: &Source,
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        let mut last_checkpoint = Instant::now();
        let mut processed = 0u64;
        while !shutdown.is_cancelled() {
            let polled = source.poll(Duration::from_millis(50));
            for change in source.take_assignments() {
                self.reassign(source, change)?;
            }
            if let Some(Err(e)) = &polled {
                tracing::warn!(error = %e, "consumer error; librdkafka retries");
            }
            if let Some(Ok(m)) = polled {
                processed += u64::from(self.handle(&m)?);
            }
            if last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.health.add_processed(std::mem::take(&mut processed));
                self.checkpoint(source, false)?;
                last_checkpoint = Instant::now();
            }
        }
        self.health.add_processed(processed);
        self.checkpoint(source, true)?;
        Ok(())
    }

    /// Applies one record; `false` when it was skipped (not owned, or already applied).
    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<bool, PipelineError> {
        let (p, offset) = (m.partition(), m.offset());
        let origin = Origin {
            partition: p,
            offset,
            timestamp: m.timestamp().to_millis(),
        };
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(false);
        };
        if part.next_offset.is_some_and(|next| offset < next) {
            return Ok(false); // already in the table
        }
        part.next_offset = Some(offset + 1);
        let checked = self
            .decoder
            .decode(m.key(), m.payload())?
            .and_then(|e| check(&e, origin.timestamp, self.max_future_skew_ms).map(|()| e));
        match checked {
            Ok(event) => {
                part.max_event_time = Some(
                    part.max_event_time
                        .map_or(event.event_time, |t| t.max(event.event_time)),
                );
                let key = crate::table::key_of(&event);
                let current = match self.dirty.get(&key) {
                    Some((_, stored)) => Some(stored.entry.clone()),
                    None => self
                        .store
                        .table_get(p, &event.profile_id, &event.title_id)?
                        .map(|s| s.entry),
                };
                match apply(current.as_ref(), &event, self.resume.completion_threshold) {
                    Applied::Updated(entry) => {
                        crate::metrics::table_update(true);
                        if self.pending.insert(key.clone(), p).is_some() {
                            crate::metrics::emit_suppressed();
                        }
                        self.dirty.insert(
                            key,
                            (
                                p,
                                StoredEntry {
                                    entry,
                                    pending: true,
                                },
                            ),
                        );
                    }
                    Applied::OutOfDate => crate::metrics::table_update(false),
                }
            }
            Err(e) => self
                .sink
                .send_dead_letter(m.key(), m.payload(), origin, &e)?,
        }
        Ok(true)
    }

    fn reassign(&mut self, source: &Source, change: Assignment) -> Result<(), PipelineError> {
        match change {
            Assignment::Assigned(partitions) => {
                for p in partitions {
                    if self.parts.contains_key(&p) {
                        continue;
                    }
                    let meta = self.store.partition_meta(STAGE, p)?;
                    // Output owed from before a restart.
                    for stored in self
                        .store
                        .table_partition(p)?
                        .into_iter()
                        .filter(|s| s.pending)
                    {
                        self.pending.insert(stored.entry.position.key(), p);
                    }
                    self.parts.insert(
                        p,
                        TablePartition {
                            next_offset: meta.map(|m| m.next_offset),
                            max_event_time: meta.and_then(|m| m.max_event_time),
                        },
                    );
                    self.view.set_owned(p, true);
                }
                self.health.set_ready("resume", true);
            }
            Assignment::Revoked(partitions) => {
                self.checkpoint(source, true)?;
                for p in partitions {
                    self.parts.remove(&p);
                    self.view.set_owned(p, false);
                }
            }
        }
        Ok(())
    }

    /// Publishes what the rate limit allows (everything when `all`), flushes, writes changed
    /// entries with offsets in one batch, and commits offsets whose updates are all published.
    fn checkpoint(&mut self, source: &Source, all: bool) -> Result<(), PipelineError> {
        let now = Instant::now();
        let interval = self.resume.emit_interval;
        let mut batch = WriteBatch::default();
        let due: Vec<(String, i32)> = self
            .pending
            .iter()
            .filter(|(key, _)| {
                all || self
                    .last_emit
                    .get(*key)
                    .is_none_or(|t| now.duration_since(*t) >= interval)
            })
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        for (key, p) in due {
            self.pending.remove(&key);
            let stored = match self.dirty.get_mut(&key) {
                Some((_, stored)) => stored.clone(),
                None => {
                    let Some((profile, title)) = crate::record::split_resume_key(&key) else {
                        continue;
                    };
                    match self.store.table_get(p, &profile, &title)? {
                        Some(stored) => stored,
                        None => continue,
                    }
                }
            };
            self.sink.send_result(
                &key,
                &stored.entry.position,
                Some(p),
                &[(EVENT_ID_HEADER, &stored.entry.event_id)],
            )?;
            self.last_emit.insert(key.clone(), now);
            self.dirty.insert(
                key,
                (
                    p,
                    StoredEntry {
                        pending: false,
                        ..stored
                    },
                ),
            );
        }
        self.last_emit
            .retain(|_, t| now.duration_since(*t) < interval);
        if self.last_retention_scan.elapsed() >= Duration::from_secs(60) || all {
            self.expire(&mut batch)?;
            self.last_retention_scan = Instant::now();
        }
        self.sink.flush()?;
        let flushed = Instant::now();
        for (_, (p, stored)) in self.dirty.drain() {
            self.store.stage_table_put(&mut batch, p, &stored)?;
        }
        let mut offsets = Vec::new();
        for (&p, part) in &self.parts {
            if let Some(next_offset) = part.next_offset {
                self.store.stage_meta(
                    &mut batch,
                    STAGE,
                    p,
                    PartitionMeta {
                        next_offset,
                        max_event_time: part.max_event_time,
                    },
                );
                offsets.push((p, next_offset));
            }
        }
        self.store.commit(batch)?;
        self.commits.push_back((now, offsets));
        // Every update older than the emit interval (plus one checkpoint) has been published.
        let safe_age = interval + self.checkpoint_interval;
        let mut commit = None;
        while self
            .commits
            .front()
            .is_some_and(|(t, _)| all || now.duration_since(*t) >= safe_age)
        {
            commit = self.commits.pop_front().map(|(_, o)| o);
        }
        if let Some(offsets) = commit {
            source.commit(offsets);
        }
        crate::metrics::table_size(self.store.table_len());
        crate::metrics::checkpoint(flushed - now, flushed.elapsed());
        Ok(())
    }

    /// Deletes entries without an update for the retention (in event time), with tombstones.
    fn expire(&mut self, batch: &mut WriteBatch) -> Result<(), PipelineError> {
        let retention = self.resume.retention.as_millis() as i64;
        for (&p, part) in &self.parts {
            let Some(now) = part.max_event_time else {
                continue;
            };
            for stored in self.store.table_partition(p)? {
                let position = &stored.entry.position;
                let key = position.key();
                if position.updated_at < now - retention && !self.dirty.contains_key(&key) {
                    self.store.stage_table_delete(
                        batch,
                        p,
                        &position.profile_id,
                        &position.title_id,
                    )?;
                    self.sink.send_tombstone(&key, p)?;
                    self.pending.remove(&key);
                }
            }
        }
        Ok(())
    }
}
