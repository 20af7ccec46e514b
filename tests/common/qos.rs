//! QoS test fixtures shared by the broker tests: the rules, a generated dataset and its
//! expected results, a feeder that keeps per-partition order, and result comparisons.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use marquee::config::Topology;
use marquee::io::decode::{frame, Decoder, PLAYBACK_EVENT_SCHEMA};
use marquee::io::registry::{HttpRegistry, SchemaRegistry};
use marquee::io::sink::{producer_config, AvroEncoder, DeliveryTracker};
use marquee::record::{PlaybackEvent, QosWindow};
use marquee::tools::gen::{partition_for, skewed_partition, GenOptions, Generator};
use rdkafka::producer::{BaseRecord, ThreadedProducer};

use super::reference::{self, Expected, Rules};
use super::{decode_qos, free_port, http_get, metric_sum, registry, unique, Consumed, Running};

pub const RULES: Rules = Rules {
    window: 10_000,
    advance: 10_000,
    grace: 5_000,
    out_of_orderness: 2_000,
};

/// A topology with the test rules and fresh topic names.
pub fn topology(input: &str, state: &Path) -> Topology {
    Topology::parse(&topology_toml(input, state), Path::new("test.toml"))
        .expect("test topology is valid")
}

/// The text of [`topology`], for tests that run the binary.
pub fn topology_toml(input: &str, state: &Path) -> String {
    format!(
        r#"
name = "qos-test"
[source]
topic = "{input}"
group_id = "{input}-group"
[source.kafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[time]
out_of_orderness = "2s"
idle_timeout = "4s"
max_future_skew = "6s"
[qos]
window = "10s"
grace = "5s"
[sink]
topic = "{input}-qos"
late_topic = "{input}-late"
dead_letter_topic = "{input}-dead"
[state]
dir = "{}"
checkpoint_interval = "200ms"
"#,
        state.display()
    )
}

/// Generated events, keyed to partitions 0 and 1 of a 3-partition topic (2 stays empty and
/// must go idle instead of stalling every window).
pub fn dataset(seed: u64, count: usize) -> Vec<(i32, PlaybackEvent)> {
    dataset_from(seed, count, GenOptions::default().start_ms)
}

/// [`dataset`] with sessions starting at `start_ms`.
pub fn dataset_from(seed: u64, count: usize, start_ms: i64) -> Vec<(i32, PlaybackEvent)> {
    let options = GenOptions {
        seed,
        start_ms,
        session_interval_ms: 300,
        heartbeat_ms: 10_000,
        max_watch_ms: 180_000,
        disorder_ms: 3_000,
        late_share: 0.02,
        late_delay_ms: 60_000,
        ..GenOptions::default()
    };
    Generator::new(options)
        .take(count)
        .map(|a| (partition_for(&a.event.session_id, 2), a.event))
        .collect()
}

/// Generated events over 4 partitions with 60% of the sessions on partition 0: a hot partition
/// whose event time advances slowest while the others run ahead (watermark alignment pauses
/// and resumes them again and again while a backlog is read).
pub fn hot_dataset(seed: u64, count: usize) -> Vec<(i32, PlaybackEvent)> {
    let options = GenOptions {
        seed,
        session_interval_ms: 200,
        heartbeat_ms: 10_000,
        max_watch_ms: 180_000,
        disorder_ms: 3_000,
        late_share: 0.01,
        late_delay_ms: 60_000,
        ..GenOptions::default()
    };
    Generator::new(options)
        .take(count)
        .map(|a| (skewed_partition(&a.event.session_id, 4, 0.6), a.event))
        .collect()
}

/// The events of each partition, in the dataset's order.
pub fn per_partition(events: &[(i32, PlaybackEvent)]) -> BTreeMap<i32, Vec<PlaybackEvent>> {
    let mut per_partition: BTreeMap<i32, Vec<PlaybackEvent>> = BTreeMap::new();
    for (p, e) in events {
        per_partition.entry(*p).or_default().push(e.clone());
    }
    per_partition
}

pub fn expected(events: &[(i32, PlaybackEvent)]) -> Expected {
    expected_with(RULES, events)
}

/// [`expected`] under other `rules` (e.g. hopping windows).
pub fn expected_with(rules: Rules, events: &[(i32, PlaybackEvent)]) -> Expected {
    reference::compute(rules, &per_partition(events))
}

/// Sends records in order, one producer, so each partition keeps the dataset's order.
pub struct Feeder {
    producer: ThreadedProducer<DeliveryTracker>,
    pub v1: AvroEncoder,
    v2_id: u32,
    topic: String,
}

impl Feeder {
    pub fn new(brokers: &str, topic: &str) -> Self {
        let registry = HttpRegistry::new(&registry().url()).unwrap();
        let subject = format!("{topic}-value");
        let v1 = AvroEncoder::register(&registry, &subject, PLAYBACK_EVENT_SCHEMA).unwrap();
        // Schema evolution: a producer adds an optional field at the end.
        let v2 = PLAYBACK_EVENT_SCHEMA.replacen(
            r#""doc": "On ERROR."}"#,
            r#""doc": "On ERROR."},
    {"name": "hdr", "type": ["null", "boolean"], "default": null}"#,
            1,
        );
        assert_ne!(v2, PLAYBACK_EVENT_SCHEMA);
        let v2_id = registry.register(&subject, &v2).unwrap();
        let producer = producer_config(brokers, &Default::default())
            .create_with_context(DeliveryTracker::default())
            .unwrap();
        Self {
            producer,
            v1,
            v2_id,
            topic: topic.to_string(),
        }
    }

    /// Every 10th event is written with the v2 writer schema.
    pub fn event(&self, partition: i32, e: &PlaybackEvent, i: usize) {
        let framed = self.v1.encode(e).unwrap();
        let value = if i % 10 == 0 {
            // The v2 record is the v1 record followed by `hdr`: null is union branch 0.
            let mut payload = framed[5..].to_vec();
            payload.push(0);
            frame(self.v2_id, &payload)
        } else {
            framed
        };
        self.raw(partition, Some(e.session_id.as_bytes()), Some(&value));
    }

    pub fn raw(&self, partition: i32, key: Option<&[u8]>, value: Option<&[u8]>) {
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.topic).partition(partition);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        marquee::io::sink::send_with_backpressure(&self.producer, record).unwrap();
    }

    pub fn flush(&self) {
        let refused = marquee::io::sink::flush_and_check(&self.producer).unwrap();
        assert!(refused.is_empty(), "refused: {refused:?}");
    }
}

pub fn results_by_key(records: &[Consumed]) -> BTreeMap<String, QosWindow> {
    let mut by_key: BTreeMap<String, QosWindow> = BTreeMap::new();
    for r in records {
        let w = decode_qos(r.value.as_deref().expect("results have values"));
        assert_eq!(r.key_str(), w.key(), "key matches the record");
        if let Some(previous) = by_key.insert(w.key(), w.clone()) {
            assert_eq!(previous, w, "a key was emitted twice with different values");
        }
    }
    by_key
}

pub fn assert_results_equal(
    actual: &BTreeMap<String, QosWindow>,
    expected: &BTreeMap<String, QosWindow>,
) {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(5)
        .collect();
    let differing: Vec<_> = expected
        .iter()
        .filter_map(|(k, e)| actual.get(k).filter(|a| !same_result(a, e)).map(|a| (e, a)))
        .take(3)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differing.is_empty(),
        "{} results, {} expected; missing {missing:?}; extra {extra:?}; differing (expected, actual) {differing:#?}",
        actual.len(),
        expected.len()
    );
}

/// Equal, with the startup percentiles within the sketch's 1% relative error of the exact
/// values.
pub fn same_result(actual: &QosWindow, expected: &QosWindow) -> bool {
    let close = |a: Option<f64>, e: Option<f64>| match (a, e) {
        (Some(a), Some(e)) => (a - e).abs() <= 0.01 * e.abs(),
        (a, e) => a == e,
    };
    let exact = |w: &QosWindow| QosWindow {
        startup_ms_p50: None,
        startup_ms_p90: None,
        startup_ms_p99: None,
        ..w.clone()
    };
    exact(actual) == exact(expected)
        && close(actual.startup_ms_p50, expected.startup_ms_p50)
        && close(actual.startup_ms_p90, expected.startup_ms_p90)
        && close(actual.startup_ms_p99, expected.startup_ms_p99)
}

pub fn late_event_ids(records: &[Consumed]) -> BTreeSet<String> {
    let mut decoder = Decoder::new(Arc::new(HttpRegistry::new(&registry().url()).unwrap()));
    records
        .iter()
        .map(|r| {
            decoder
                .decode(r.key.as_deref(), r.value.as_deref())
                .unwrap()
                .expect("late records are the original, decodable bytes")
                .event_id
        })
        .collect()
}

/// Reads the result and late topics of `topology` until they hold what `expected` predicts.
pub fn read_outputs(
    brokers: &str,
    topology: &Topology,
    expected: &Expected,
    timeout: std::time::Duration,
) -> (Vec<Consumed>, Vec<Consumed>) {
    use std::time::{Duration, Instant};
    // Every key, not a number of records: replays after a crash add identical duplicates.
    let deadline = Instant::now() + timeout;
    let results = loop {
        let records = super::read_topic(
            brokers,
            &topology.sink.topic,
            expected.results.len(),
            Duration::from_secs(6),
            deadline.saturating_duration_since(Instant::now()),
        );
        let keys: BTreeSet<String> = records.iter().map(|r| r.key_str()).collect();
        // Another round needs time to find the topic and read it again.
        let left = deadline.saturating_duration_since(Instant::now());
        if keys.len() >= expected.results.len() || left < Duration::from_secs(10) {
            break records;
        }
    };
    let late = super::read_topic(
        brokers,
        &topology.sink.late_topic,
        expected.late.len(),
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    (results, late)
}

/// Reads a 300,000-record backlog with a hot partition on `brokers` while watermark alignment
/// pauses and resumes the other partitions again and again: every record is handled exactly
/// once, so the results and the late topic equal the reference.
pub fn alignment_scenario(brokers: &str) {
    let input = unique("hot-events");
    super::create_topic(brokers, &input, 4);
    let state = tempfile::tempdir().unwrap();
    let mut topology = topology(&input, state.path());
    // Small enough that the partitions ahead of the hot one are paused again and again.
    topology.time.max_partition_drift = Duration::from_secs(20);

    let events = hot_dataset(23, 300_000);
    let expected = expected(&events);
    let feeder = Feeder::new(brokers, &input);
    for (i, (p, e)) in events.iter().enumerate() {
        feeder.event(*p, e, i);
    }
    feeder.flush();

    let http = format!("127.0.0.1:{}", free_port());
    let running = Running::start(&topology, brokers, Some(http.parse().unwrap()));
    let (results, late) = read_outputs(brokers, &topology, &expected, Duration::from_secs(240));
    let (_, page) = http_get(&http, "/metrics");
    running.stop();

    let topic_label = format!("topic=\"{input}\"");
    let pauses = metric_sum(&page, "marquee_partition_pauses_total", &topic_label);
    assert!(
        pauses >= 10.0,
        "alignment paused partitions only {pauses} times; the test needs many pauses"
    );
    let handled = metric_sum(&page, "marquee_records_consumed_total", &topic_label);
    assert_eq!(
        handled as usize,
        events.len(),
        "every produced record is handled exactly once"
    );
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(results.len(), expected.results.len());
    assert_eq!(
        late_event_ids(&late),
        expected.late,
        "the late topic holds exactly the late records"
    );
    assert_eq!(late.len(), expected.late.len());
}

/// Every DAU record of `topic` (at least `keys` of them), grouped by key in topic order.
pub fn daily_records(
    brokers: &str,
    topic: &str,
    keys: usize,
) -> BTreeMap<String, Vec<marquee::record::DailyActive>> {
    use std::time::Duration;
    let schema = apache_avro::Schema::parse_str(marquee::io::sink::DAILY_ACTIVE_SCHEMA).unwrap();
    let records = super::read_committed(
        brokers,
        topic,
        keys,
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    let mut by_key: BTreeMap<String, Vec<marquee::record::DailyActive>> = BTreeMap::new();
    for r in &records {
        let (_, mut payload) =
            marquee::io::decode::split_frame(r.value.as_deref().unwrap()).unwrap();
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap();
        let d: marquee::record::DailyActive =
            apache_avro::from_value(&reader.read_value(&mut payload).unwrap()).unwrap();
        assert_eq!(r.key_str(), d.key(), "key matches the record");
        by_key.entry(d.key()).or_default().push(d);
    }
    by_key
}

/// The newest exact DAU value of each key, as the reference states it.
pub fn newest_daily(
    records: &BTreeMap<String, Vec<marquee::record::DailyActive>>,
) -> BTreeMap<String, reference::Daily> {
    records
        .iter()
        .map(|(k, v)| {
            let d = v.last().expect("a key has records");
            assert!(d.exact, "{k}: counted exactly");
            let finals = v.iter().filter(|d| d.is_final).count();
            assert!(
                finals <= 1 && (finals == 0 || d.is_final),
                "{k}: one final value, the last"
            );
            let daily = reference::Daily {
                accounts: d.accounts as usize,
                profiles: d.profiles as usize,
                is_final: d.is_final,
            };
            (k.clone(), daily)
        })
        .collect()
}

/// Every result key of `topic` as a `read_committed` consumer sees it (waiting up to
/// `timeout` until there are `keys` distinct keys), with every record, duplicates included.
pub fn committed_results(
    brokers: &str,
    topic: &str,
    keys: usize,
    timeout: std::time::Duration,
) -> Vec<Consumed> {
    use std::time::Duration;
    super::wait_for("every result", timeout, || {
        let records = super::read_committed(
            brokers,
            topic,
            keys,
            Duration::from_secs(2),
            Duration::from_secs(15),
        );
        let seen: BTreeSet<String> = records.iter().map(|r| r.key_str()).collect();
        (seen.len() >= keys).then_some(records)
    })
}

/// Exactly-once, read from the cluster: the committed results and late records of
/// `topology` (waiting up to `timeout` for every result key) equal the reference, each once.
pub fn assert_committed_exactly_once(
    brokers: &str,
    topology: &Topology,
    expected: &Expected,
    timeout: Duration,
) {
    let keys = expected.results.len();
    let results = committed_results(brokers, &topology.sink.topic, keys, timeout);
    let late = super::read_committed(
        brokers,
        &topology.sink.late_topic,
        expected.late.len(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert_exactly_once(&results, &late, expected);
}

/// Exactly-once: `results` and `late` (every record a `read_committed` reader sees) equal the
/// reference, with each result and each late record once.
pub fn assert_exactly_once(results: &[Consumed], late: &[Consumed], expected: &Expected) {
    assert_results_equal(&results_by_key(results), &expected.results);
    let mut seen: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for r in results {
        seen.entry(r.key_str())
            .or_default()
            .push((r.partition, r.offset));
    }
    seen.retain(|_, at| at.len() > 1);
    assert!(
        seen.is_empty(),
        "every result exactly once; these keys were written more than once (partition, offset): {seen:?}"
    );
    assert_eq!(late_event_ids(late), expected.late);
    assert_eq!(
        late.len(),
        expected.late.len(),
        "every late record exactly once"
    );
}

/// The QoS, DAU and resume topology of the many-instance scenarios over `input`, with a
/// checkpoint every `checkpoint_interval`.
pub fn many_instances_toml(input: &str, checkpoint_interval: &str) -> String {
    let toml = topology_toml(input, Path::new("unused"))
        .replace(
            "checkpoint_interval = \"200ms\"",
            &format!("checkpoint_interval = \"{checkpoint_interval}\""),
        )
        // Longer than any pause of the scenarios (a restart, a rebalance, a restore): a
        // partition idle in such a pause would, by design, let windows close before its next
        // records, which the reference does not model.
        .replace("idle_timeout = \"4s\"", "idle_timeout = \"30s\"")
        + &format!(
            "[resume]\ntopic = \"{input}-positions\"\npartitions = 3\nemit_interval = \"200ms\"\n"
        )
        + &format!("[dau]\ntopic = \"{input}-dau\"\ninterval = \"1s\"\ngrace = \"5s\"\n");
    assert!(toml.contains("idle_timeout = \"30s\""));
    toml
}

/// `events` with their sessions spread over `partitions` partitions.
pub fn spread(events: Vec<(i32, PlaybackEvent)>, partitions: i32) -> Vec<(i32, PlaybackEvent)> {
    events
        .into_iter()
        .map(|(_, e)| (partition_for(&e.session_id, partitions), e))
        .collect()
}
