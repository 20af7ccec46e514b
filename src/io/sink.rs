//! The producer side: Avro encoding with registered schemas, result records, the late and
//! dead-letter copies (original bytes plus `marquee.*` headers), and delivery tracking.
//!
//! Sends are asynchronous; [`Sink::flush`] waits for every delivery and fails if any failed.
//! The pipeline flushes before it writes a checkpoint, so an offset is only stored once the
//! outputs it produced are on the broker (at-least-once; keyed, deterministic outputs make a
//! replay overwrite rather than add).
//!
//! An output the broker refuses because of the record itself (too large for the topic, a
//! timestamp outside its bounds) would fail every flush after every restart: it goes to the
//! dead-letter topic instead, with reason `output_refused` (see [`Sink::flush`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, ToBytes};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use serde::Serialize;

use crate::error::{DecodeError, PipelineError, RegistryError};
use crate::io::decode::frame;
use crate::io::registry::SchemaRegistry;
use crate::record::Origin;

/// The schema of QoS window results.
pub const QOS_WINDOW_SCHEMA: &str = include_str!("../../avro/qos_window.avsc");
/// The writer schema of DAU records.
pub const DAILY_ACTIVE_SCHEMA: &str = include_str!("../../avro/daily_active.avsc");

/// Encodes values of one registered schema as Confluent-framed Avro.
pub struct AvroEncoder {
    writer: GenericDatumWriter<'static>,
    id: u32,
}

impl AvroEncoder {
    /// Registers `schema` under `subject` and prepares a writer for it.
    pub fn register(
        registry: &dyn SchemaRegistry,
        subject: &str,
        schema: &str,
    ) -> Result<Self, RegistryError> {
        let parsed =
            Schema::parse_str(schema).map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        let id = registry.register(subject, schema)?;
        // One schema per output topic for the life of the process.
        let parsed: &'static Schema = Box::leak(Box::new(parsed));
        let writer = GenericDatumWriter::builder(parsed)
            .build()
            .map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        Ok(Self { writer, id })
    }

    /// The registry id of the schema.
    pub fn schema_id(&self) -> u32 {
        self.id
    }

    /// Serializes `value` and frames it.
    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, PipelineError> {
        let payload = self
            .writer
            .write_ser_to_vec(value)
            .map_err(|e| PipelineError::Encode {
                what: std::any::type_name::<T>().to_string(),
                message: e.to_string(),
            })?;
        Ok(frame(self.id, &payload))
    }
}

/// Counts failed deliveries and keeps refused records; reported by the next [`flush_and_check`].
#[derive(Default)]
pub struct DeliveryTracker {
    failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    refused: Mutex<Vec<Refused>>,
}

impl DeliveryTracker {
    /// Forgets failed deliveries: those of a finished transaction are reported by its commit.
    fn forget_failures(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn refuse(&self, refused: Refused) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(refused);
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let Err((error, message)) = result else {
            return;
        };
        // Purged by the abort of a transaction: sent again with the next attempt.
        if matches!(
            error,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
            )
        ) {
            return;
        }
        match refusal(error) {
            Some(error) => self.refuse(Refused {
                topic: message.topic().to_string(),
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers: message.headers().map(owned_headers).unwrap_or_default(),
                error,
            }),
            None => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| format!("to {}: {error}", message.topic()));
            }
        }
    }
}

/// An output the broker (or the producer's own size limit) refused because of the record
/// itself: sending it again can never succeed.
#[derive(Debug)]
pub struct Refused {
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    error: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.value.as_ref().map_or(0, Vec::len);
        write!(
            f,
            "{} refused a record of {bytes} bytes: {}",
            self.topic, self.error
        )
    }
}

/// The description of `error` when it condemns the record rather than the broker or network.
fn refusal(error: &KafkaError) -> Option<String> {
    use RDKafkaErrorCode::*;
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return None,
    };
    matches!(
        code,
        InvalidMessageSize
            | MessageSizeTooLarge
            | MessageBatchTooLarge
            | InvalidTimestamp
            | InvalidRecord
    )
    .then(|| error.to_string())
}

fn owned_headers(headers: &impl Headers) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
        .collect()
}

/// Producer defaults: safe delivery and a bounded queue. Topology `sink.kafka` entries win.
pub fn producer_config(brokers: &str, overrides: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.kbytes", "65536")
        .set("message.timeout.ms", "60000");
    for (k, v) in overrides {
        config.set(k, v);
    }
    // librdkafka refuses a transactional producer whose deliveries outlive its transactions.
    if let (Some(tx), None) = (
        overrides.get("transaction.timeout.ms"),
        overrides.get("message.timeout.ms"),
    ) {
        if tx.parse::<u64>().is_ok_and(|tx| tx < 60_000) {
            config.set("message.timeout.ms", tx);
        }
    }
    config
}

/// One registered output of an operator: its topic and the encoder of its schema.
pub struct Output {
    /// The topic results are written to.
    pub topic: String,
    encoder: AvroEncoder,
}

impl Output {
    /// Registers `schema` as `<topic>-value`.
    pub fn register(
        registry: &dyn SchemaRegistry,
        topic: &str,
        schema: &str,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            topic: topic.to_string(),
            encoder: AvroEncoder::register(registry, &format!("{topic}-value"), schema)?,
        })
    }
}

/// The producer of one task: every operator's outputs, late copies and dead letters, flushed
/// together at each checkpoint.
pub struct Sink {
    producer: ThreadedProducer<DeliveryTracker>,
    dead_letter: String,
    source_topic: String,
    /// Exactly-once: records wait here for the checkpoint's transaction instead of being sent.
    outbox: Option<Mutex<Vec<Pending>>>,
}

/// An output record held for a transaction, owning its bytes (it is also stored in the
/// checkpoint's RocksDB batch, see [`Pending::encode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Pending {
    fn of<K, P>(record: &BaseRecord<'_, K, P>) -> Self
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        Self {
            topic: record.topic.to_string(),
            partition: record.partition,
            key: record.key.map(|k| k.to_bytes().to_vec()),
            value: record.payload.map(|v| v.to_bytes().to_vec()),
            timestamp: record.timestamp,
            headers: record
                .headers
                .as_ref()
                .map(owned_headers)
                .unwrap_or_default(),
        }
    }

    fn record(&self) -> BaseRecord<'_, [u8], [u8]> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic);
        record.partition = self.partition;
        record.key = self.key.as_deref();
        record.payload = self.value.as_deref();
        record.timestamp = self.timestamp;
        if !self.headers.is_empty() {
            let mut owned = OwnedHeaders::new_with_capacity(self.headers.len());
            for (k, v) in &self.headers {
                owned = owned.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            record.headers = Some(owned);
        }
        record
    }

    /// The stored form: length-prefixed fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
            match b {
                None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
                Some(b) => {
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
        out.clear();
        bytes(out, Some(self.topic.as_bytes()));
        out.extend_from_slice(&self.partition.unwrap_or(-1).to_le_bytes());
        bytes(out, self.key.as_deref());
        bytes(out, self.value.as_deref());
        out.extend_from_slice(&self.timestamp.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (k, v) in &self.headers {
            bytes(out, Some(k.as_bytes()));
            bytes(out, Some(v));
        }
    }

    /// Reads [`Pending::encode`]'s form; `None` when malformed.
    pub fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = b.split_at_checked(n)?;
            *b = rest;
            Some(head)
        }
        fn bytes(b: &mut &[u8]) -> Option<Option<Vec<u8>>> {
            let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?);
            if n == u32::MAX {
                return Some(None);
            }
            Some(Some(take(b, n as usize)?.to_vec()))
        }
        let topic = String::from_utf8(bytes(&mut b)??).ok()?;
        let partition = i32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let key = bytes(&mut b)?;
        let value = bytes(&mut b)?;
        let timestamp = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let n = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let mut headers = Vec::new();
        for _ in 0..n {
            let k = String::from_utf8(bytes(&mut b)??).ok()?;
            headers.push((k, bytes(&mut b)??));
        }
        b.is_empty().then_some(Self {
            topic,
            partition: (partition >= 0).then_some(partition),
            key,
            value,
            timestamp: (timestamp != i64::MIN).then_some(timestamp),
            headers,
        })
    }
}

impl Sink {
    /// Connects a producer for a task reading `source_topic`.
    pub fn new(
        config: &ClientConfig,
        dead_letter: &str,
        source_topic: &str,
    ) -> Result<Self, PipelineError> {
        let producer: ThreadedProducer<DeliveryTracker> = config
            .create_with_context(DeliveryTracker::default())
            .map_err(PipelineError::kafka("creating the producer"))?;
        Ok(Self {
            producer,
            dead_letter: dead_letter.to_string(),
            source_topic: source_topic.to_string(),
            outbox: None,
        })
    }

    /// A transactional producer (exactly-once) with `transactional_id`: records are held
    /// until [`Sink::publish`] sends them in one transaction with the input offsets. Fences
    /// any earlier producer with the same id, aborting its open transaction.
    pub fn transactional(
        config: &ClientConfig,
        dead_letter: &str,
        source_topic: &str,
        transactional_id: &str,
    ) -> Result<Self, PipelineError> {
        let mut config = config.clone();
        config.set("transactional.id", transactional_id);
        let mut sink = Self::new(&config, dead_letter, source_topic)?;
        sink.producer
            .init_transactions(Duration::from_secs(60))
            .map_err(PipelineError::kafka(format!(
                "initialising transactions as {transactional_id} (does the broker support them?)"
            )))?;
        sink.outbox = Some(Mutex::new(Vec::new()));
        Ok(sink)
    }

    /// Whether outputs wait for a transaction.
    pub fn is_transactional(&self) -> bool {
        self.outbox.is_some()
    }

    /// The records held since the last call (exactly-once).
    pub fn take_outbox(&self) -> Vec<Pending> {
        self.outbox
            .as_ref()
            .map(|o| std::mem::take(&mut *o.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    /// Sends `records` and `marker` (if any) and commits `offsets` for the consumer group
    /// `group` in one transaction. A record the broker refuses because of the record itself aborts the
    /// attempt; it is then replaced by its dead-letter copy and the transaction retried.
    pub fn publish(
        &self,
        records: &[Pending],
        marker: Option<&Pending>,
        offsets: &rdkafka::TopicPartitionList,
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<(), PipelineError> {
        let mut records = records.to_vec();
        for _attempt in 0..3 {
            let kafka = |what: &'static str| PipelineError::kafka(what);
            self.producer
                .begin_transaction()
                .map_err(kafka("beginning a transaction"))?;
            for r in records.iter().chain(marker) {
                send_with_backpressure(&self.producer, r.record())?;
            }
            let committed = self.commit_transaction(offsets, group);
            // A record that timed out fails the commit; it must not fail a later flush too.
            self.producer.context().forget_failures();
            let refused = std::mem::take(
                &mut *self
                    .producer
                    .context()
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            match committed {
                Ok(()) if refused.is_empty() => return Ok(()),
                Ok(()) => {
                    return Err(PipelineError::Other(format!(
                        "a transaction committed although {} record(s) were refused",
                        refused.len()
                    )))
                }
                Err(e) if refused.is_empty() => {
                    let _ = self.producer.abort_transaction(Duration::from_secs(60));
                    // The broker's hint only where transactions themselves failed, not where
                    // a rebalance aborted one.
                    let aborted = matches!(&e, KafkaError::Transaction(t) if !t.is_fatal());
                    let context = if aborted {
                        "committing a transaction (aborted)"
                    } else {
                        "committing a transaction (brokers without Kafka transactions, such as \
                         Tansu, need `processing.guarantee = \"at_least_once\"`)"
                    };
                    return Err(PipelineError::kafka(context)(e));
                }
                Err(_) => {
                    self.producer
                        .abort_transaction(Duration::from_secs(60))
                        .map_err(kafka("aborting a transaction with refused records"))?;
                    for r in refused {
                        let copy = self.dead_letter_copy(&r)?;
                        let same = |p: &Pending| {
                            p.topic == r.topic && p.key == r.key && p.value == r.value
                        };
                        if let Some(slot) = records.iter_mut().find(|p| same(p)) {
                            *slot = copy;
                        }
                    }
                }
            }
        }
        Err(PipelineError::Other(
            "a transaction kept failing on refused records".into(),
        ))
    }

    /// Sends a record built elsewhere (a changelog record), held like any other output when
    /// the sink is transactional.
    pub fn send_pending(&self, record: &Pending) -> Result<(), PipelineError> {
        self.send(record.record())
    }

    /// Adds `offsets` to the open transaction and commits it. A retriable failure (a timeout,
    /// a coordinator moving) is retried, never aborted: the commit may have gone through, and
    /// an abort would make the caller produce the same outputs again.
    fn commit_transaction(
        &self,
        offsets: &rdkafka::TopicPartitionList,
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> KafkaResult<()> {
        let timeout = Duration::from_secs(60);
        let retriable = |e: &KafkaError| {
            matches!(e, KafkaError::Transaction(t)
                if t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal())
        };
        let mut offsets_sent = offsets.count() == 0;
        let mut attempt = 0;
        loop {
            let result = if offsets_sent {
                self.producer.commit_transaction(timeout)
            } else {
                self.producer
                    .send_offsets_to_transaction(offsets, group, timeout)
                    .map(|()| offsets_sent = true)
                    .and_then(|()| self.producer.commit_transaction(timeout))
            };
            match result {
                Err(e) if retriable(&e) && attempt < 10 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "committing a transaction failed for now; retrying");
                    std::thread::sleep(Duration::from_millis(200 * attempt));
                }
                other => return other,
            }
        }
    }

    /// Sends one result record to `output` (to `partition`, or by key).
    pub fn send_result<T: Serialize>(
        &self,
        output: &Output,
        key: &str,
        value: &T,
        partition: Option<i32>,
        headers: &[(&str, &str)],
    ) -> Result<(), PipelineError> {
        let value = output.encoder.encode(value)?;
        let mut record = BaseRecord::to(&output.topic)
            .key(key.as_bytes())
            .payload(&value);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if !headers.is_empty() {
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (k, v) in headers {
                owned = owned.insert(header(k, v));
            }
            record = record.headers(owned);
        }
        self.send(record)
    }

    /// Sends a tombstone (null value) for `key` to `output`: compaction deletes the entry.
    pub fn send_tombstone(
        &self,
        output: &Output,
        key: &str,
        partition: i32,
    ) -> Result<(), PipelineError> {
        let record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&output.topic)
            .key(key.as_bytes())
            .partition(partition);
        self.send(record)
    }

    /// Sends input bytes unchanged to `partition` of `topic` (an internal topic), keeping the
    /// record's timestamp.
    pub fn send_raw(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        partition: i32,
        timestamp: Option<i64>,
    ) -> Result<(), PipelineError> {
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).key(key).partition(partition);
        if let Some(value) = value {
            record = record.payload(value);
        }
        if let Some(ts) = timestamp {
            record = record.timestamp(ts);
        }
        self.send(record)
    }

    /// Sends a late record unchanged to `late_topic`.
    pub fn send_late(
        &self,
        late_topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        origin: Origin,
        window_start: i64,
        watermark: i64,
    ) -> Result<(), PipelineError> {
        let headers = self
            .origin_headers(origin, "late")
            .insert(header("marquee.window.start", &window_start.to_string()))
            .insert(header("marquee.watermark", &watermark.to_string()));
        self.send_copy(late_topic, key, value, origin, headers)
    }

    /// Sends an undecodable or untrusted record unchanged to the dead-letter topic.
    pub fn send_dead_letter(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        origin: Origin,
        error: &DecodeError,
    ) -> Result<(), PipelineError> {
        let headers = self
            .origin_headers(origin, error.reason())
            .insert(header("marquee.error", &error.to_string()));
        self.send_copy(&self.dead_letter, key, value, origin, headers)
    }

    /// Waits until every record sent so far is delivered; fails if any delivery failed.
    ///
    /// Outputs refused because of the record itself go to the dead-letter topic (reason
    /// `output_refused`); a refused dead-letter copy is sent again without its value, and only
    /// when even that is refused does the flush fail.
    pub fn flush(&self) -> Result<(), PipelineError> {
        loop {
            let refused = flush_and_check(&self.producer)?;
            if refused.is_empty() {
                return Ok(());
            }
            self.dead_letter_refused(refused)?;
        }
    }

    fn dead_letter_refused(&self, refused: Vec<Refused>) -> Result<(), PipelineError> {
        for r in refused {
            let copy = self.dead_letter_copy(&r)?;
            self.send(copy.record())?;
        }
        Ok(())
    }

    /// The dead-letter copy of an output refused because of the record itself (counted and
    /// logged), or an error when even the value-less copy of a dead letter was refused.
    fn dead_letter_copy(&self, r: &Refused) -> Result<Pending, PipelineError> {
        let dead_letter = self.dead_letter.as_str();
        crate::metrics::output_refused(&r.topic);
        tracing::warn!(
            topic = r.topic,
            key = %String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
            error = r.error,
            "the broker refused an output because of the record itself; \
             it goes to the dead-letter topic with reason output_refused"
        );
        let omit_value = r.topic == dead_letter;
        if omit_value && r.value.is_none() {
            return Err(PipelineError::Other(format!(
                "the dead-letter topic {dead_letter} refused a record even without its value: {} \
                 (check the topic's max.message.bytes and message.timestamp settings)",
                r.error
            )));
        }
        let mut headers: Vec<(String, Vec<u8>)>;
        if omit_value {
            // The dead-letter copy itself was refused: the same record without its value
            // (its source coordinates tell where the original is).
            headers = r.headers.clone();
            let size = r.value.as_ref().map_or(0, Vec::len).to_string();
            headers.push(("marquee.value.omitted.bytes".into(), size.into_bytes()));
            headers.push((
                "marquee.value.omitted.error".into(),
                r.error.clone().into_bytes(),
            ));
        } else {
            // The refusal's reason replaces an earlier one (a late copy's); the source
            // coordinates stay.
            headers = r
                .headers
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "marquee.reason" | "marquee.error"))
                .cloned()
                .collect();
            headers.push(("marquee.reason".into(), b"output_refused".to_vec()));
            headers.push(("marquee.error".into(), r.error.clone().into_bytes()));
            headers.push(("marquee.output.topic".into(), r.topic.clone().into_bytes()));
        }
        // No timestamp: the broker's own clock always passes its timestamp bounds.
        Ok(Pending {
            topic: dead_letter.to_string(),
            partition: None,
            key: r.key.clone(),
            value: r.value.clone().filter(|_| !omit_value),
            timestamp: None,
            headers,
        })
    }

    fn origin_headers(&self, origin: Origin, reason: &str) -> OwnedHeaders {
        OwnedHeaders::new_with_capacity(6)
            .insert(header("marquee.reason", reason))
            .insert(header("marquee.source.topic", &self.source_topic))
            .insert(header(
                "marquee.source.partition",
                &origin.partition.to_string(),
            ))
            .insert(header("marquee.source.offset", &origin.offset.to_string()))
    }

    fn send_copy(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        origin: Origin,
        headers: OwnedHeaders,
    ) -> Result<(), PipelineError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        if let Some(ts) = origin.timestamp {
            record = record.timestamp(ts);
        }
        self.send(record)
    }

    fn send<K, P>(&self, record: BaseRecord<'_, K, P>) -> Result<(), PipelineError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        if let Some(outbox) = &self.outbox {
            let pending = Pending::of(&record);
            outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(pending);
            return Ok(());
        }
        send_with_backpressure(&self.producer, record)
    }
}

/// Sends, waiting while the bounded local queue is full (backpressure, never a drop).
pub fn send_with_backpressure<K, P>(
    producer: &ThreadedProducer<DeliveryTracker>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), PipelineError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            // Larger than the producer's `message.max.bytes`: refused like a broker would.
            Err((e, back)) if refusal(&e).is_some() => {
                producer.context().refuse(Refused {
                    topic: back.topic.to_string(),
                    key: back.key.map(|k| k.to_bytes().to_vec()),
                    value: back.payload.map(|v| v.to_bytes().to_vec()),
                    headers: back.headers.as_ref().map(owned_headers).unwrap_or_default(),
                    error: e.to_string(),
                });
                return Ok(());
            }
            Err((e, _)) => return Err(PipelineError::kafka("sending a record")(e)),
        }
    }
}

/// Waits for every record `producer` has queued; fails if any delivery failed. Returns the
/// records refused because of themselves, for the caller to dead-letter.
#[must_use = "refused records must be dead-lettered"]
pub fn flush_and_check(
    producer: &ThreadedProducer<DeliveryTracker>,
) -> Result<Vec<Refused>, PipelineError> {
    producer
        .flush(Duration::from_secs(60))
        .map_err(PipelineError::kafka(
            "flushing outputs (is the broker reachable?)",
        ))?;
    let tracker = producer.context();
    let failures = tracker.failures.swap(0, Ordering::Relaxed);
    if failures > 0 {
        let first = tracker
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        return Err(PipelineError::Other(format!(
            "{failures} record(s) were not delivered, first {}",
            first.unwrap_or_default()
        )));
    }
    Ok(std::mem::take(
        &mut *tracker.refused.lock().unwrap_or_else(|e| e.into_inner()),
    ))
}

/// Topic setting of compacted topics (a table's output: the latest value per key is kept).
pub const COMPACTED: &[(&str, &str)] = &[("cleanup.policy", "compact")];

/// A topic Marquee creates when it is missing.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    /// Partitions; `None` takes the broker's `num.partitions`.
    pub partitions: Option<i32>,
    /// Replicas; `None` takes the broker's `default.replication.factor`.
    pub replication_factor: Option<i32>,
    /// Topic settings, e.g. [`COMPACTED`].
    pub configs: &'a [(&'a str, &'a str)],
}

/// Creates the `topics` that do not exist yet, with one cluster round trip for those that do.
/// Brokers that cannot create topics (or auto-create them) only get a warning.
pub fn ensure_topics(config: &ClientConfig, topics: &[TopicSpec<'_>]) -> Result<(), PipelineError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    // A metadata request for a missing topic must not create it with the broker's default
    // partition count before CreateTopics asks for the configured one.
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = config
        .clone()
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(PipelineError::kafka("creating an admin client"))?;
    let brokers = config.get("bootstrap.servers").unwrap_or_default();
    // One round trip tells whether the cluster is reachable at all: fail fast and say so.
    let listed = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(PipelineError::kafka(format!(
            "reaching the cluster at {brokers} (is it running and reachable?)"
        )))?;
    let present =
        |t: &rdkafka::metadata::MetadataTopic| t.error().is_none() && !t.partitions().is_empty();
    let listed: Vec<&str> = listed
        .topics()
        .iter()
        .filter(|t| present(t))
        .map(|t| t.name())
        .collect();
    // Only ask for what is missing: some brokers (librdkafka's mock cluster) cannot create
    // topics at all, and auto-create them on a metadata request for the topic instead.
    let exists = |topic: &str| {
        listed.contains(&topic)
            || admin
                .inner()
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| m.topics().first().map(present))
                .unwrap_or(false)
    };
    let new: Vec<_> = topics
        .iter()
        .filter(|t| !exists(t.name))
        .map(|t| {
            t.configs.iter().fold(
                NewTopic::new(
                    t.name,
                    t.partitions.unwrap_or(-1),
                    TopicReplication::Fixed(t.replication_factor.unwrap_or(-1)),
                ),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            PipelineError::Other(format!("cannot start a runtime for topic creation: {e}"))
        })?;
    let timeout = Some(Duration::from_secs(10));
    let options = AdminOptions::new()
        .operation_timeout(timeout)
        .request_timeout(timeout);
    let failed: Vec<&str> = match runtime.block_on(admin.create_topics(&new, &options)) {
        Ok(results) => results
            .into_iter()
            .filter_map(|result| match result {
                Ok(topic) => {
                    tracing::info!(topic, "created topic");
                    None
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                Err((topic, code)) => {
                    tracing::warn!(topic, %code, "cannot create topic");
                    topics.iter().map(|t| t.name).find(|n| *n == topic)
                }
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create topics");
            new.iter().map(|t| t.name).collect()
        }
    };
    // Brokers without CreateTopics (librdkafka's mock cluster) create a topic when a client
    // that allows it asks for its metadata.
    if !failed.is_empty() {
        let creator: rdkafka::producer::BaseProducer = config
            .create()
            .map_err(PipelineError::kafka("creating a metadata client"))?;
        for topic in failed {
            let _ = creator
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(5));
        }
    }
    Ok(())
}

/// The number of partitions of `topic`, or `None` when it does not exist (without creating
/// it on a broker that auto-creates topics).
pub fn partitions_of(config: &ClientConfig, topic: &str) -> Result<Option<i32>, PipelineError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = config
        .clone()
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(PipelineError::kafka("creating a metadata client"))?;
    let brokers = config.get("bootstrap.servers").unwrap_or_default();
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(PipelineError::kafka(format!(
            "reaching the cluster at {brokers} (is it running and reachable?) for the \
             metadata of {topic}"
        )))?;
    Ok(match metadata.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Some(t.partitions().len() as i32)
        }
        _ => None,
    })
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Outbox records come back from the store exactly as they were held.
        #[test]
        fn pending_records_round_trip(
            topic in "[a-z.-]{1,20}",
            partition in prop::option::of(0i32..100),
            key in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
            value in prop::option::of(prop::collection::vec(any::<u8>(), 0..200)),
            timestamp in prop::option::of(0i64..4_000_000_000_000),
            headers in prop::collection::vec(("[a-z.]{1,12}", prop::collection::vec(any::<u8>(), 0..20)), 0..4),
        ) {
            let pending = Pending { topic, partition, key, value, timestamp, headers };
            let mut bytes = Vec::new();
            pending.encode(&mut bytes);
            prop_assert_eq!(Pending::decode(&bytes), Some(pending));
            prop_assert_eq!(Pending::decode(&bytes[..bytes.len() - 1]), None);
        }
    }
}
