//! The resume-position table, end to end: repartition by profile
//! ([`crate::operators::repartition`]), apply events to the table in RocksDB and publish
//! rate-limited updates and tombstones to a compacted topic ([`crate::operators::table`]);
//! here: restore a new machine's table from that topic, and what the HTTP side reads.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::ResumeConfig;
use crate::error::PipelineError;
use crate::io::decode::split_frame;
use crate::io::source::consumer_config;
use crate::record::ResumePosition;
use crate::state::{Store, StoredEntry};
use crate::table::Entry;
use crate::tools::gen::partition_for;

/// The resume schema.
pub const RESUME_POSITION_SCHEMA: &str = include_str!("../avro/resume_position.avsc");
/// Header carrying the event id that orders ties, so a restored table breaks them the same way.
pub const EVENT_ID_HEADER: &str = "marquee.event_id";
/// How often a running restore reports its progress.
const RESTORE_REPORT: Duration = Duration::from_secs(5);

/// What the HTTP side may read: the store and which table partitions this instance owns.
pub struct TableView {
    pub store: Arc<Store>,
    /// Number of table partitions (of the repartition and output topics).
    pub partitions: i32,
    owned: RwLock<BTreeSet<i32>>,
    /// Caps the queries answered at once (see `crate::serve::http`).
    pub queries: tokio::sync::Semaphore,
}

impl TableView {
    /// A view of `store` for a table of `partitions` partitions, none owned yet.
    pub fn new(store: Arc<Store>, partitions: i32) -> Self {
        Self {
            store,
            partitions,
            owned: RwLock::new(BTreeSet::new()),
            queries: tokio::sync::Semaphore::new(crate::serve::http::MAX_CONCURRENT_QUERIES),
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

    /// Marks `partition` owned (its state restored) or not.
    pub(crate) fn set_owned(&self, partition: i32, owned: bool) {
        let mut set = self.owned.write().unwrap_or_else(|e| e.into_inner());
        if owned {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }
}

/// Rebuilds the table from the compacted output topic when this state directory has never
/// held it (a new machine); a directory that has it is left alone.
pub fn restore(
    store: &Store,
    brokers: &str,
    resume: &ResumeConfig,
    decoder_registry: &dyn crate::io::registry::SchemaRegistry,
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
    let mut batch = crate::state::Batch::default();
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
        crate::io::source::log_consumer_error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

fn decode_position(
    value: &[u8],
    reader: &apache_avro::Schema,
    writers: &mut HashMap<u32, apache_avro::Schema>,
    registry: &dyn crate::io::registry::SchemaRegistry,
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
