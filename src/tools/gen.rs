//! A synthetic playback-event generator that follows the input contract: sessions that start,
//! wait for the first frame, play with heartbeats, stall, pause, seek, switch bitrate, fail
//! before starting, exit before starting, and end, across CDNs, countries and devices.
//!
//! Events come out in *arrival* order: each is delayed by a random amount up to `disorder_ms`,
//! and a `late_share` of them by `late_delay_ms`, so tests, the demo and the benchmarks see
//! the disorder and lateness real clients produce. The same seed gives the same events.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::record::{EventType, PlaybackEvent};

const CDNS: [(&str, f64); 4] = [
    ("akamai", 0.02),
    ("fastly", 0.03),
    ("cloudfront", 0.025),
    ("edgecast", 0.08),
];
const COUNTRIES: [&str; 10] = ["US", "BR", "GB", "DE", "IN", "JP", "MX", "FR", "NL", "KR"];
const DEVICES: [&str; 4] = ["tv", "mobile", "web", "console"];
const ERRORS: [&str; 4] = [
    "DRM_LICENSE_FAILED",
    "MANIFEST_TIMEOUT",
    "NETWORK_ERROR",
    "DECODER_INIT",
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Seed of the random choices.
    pub seed: u64,
    /// Event time of the first session start, epoch millis.
    pub start_ms: i64,
    /// Event time between two session starts.
    pub session_interval_ms: i64,
    /// Time between heartbeats of a playing session.
    pub heartbeat_ms: i64,
    /// Longest watch time of a session.
    pub max_watch_ms: i64,
    /// Arrival delay of an on-time event: uniform in `[0, disorder_ms]`.
    pub disorder_ms: i64,
    /// Share of events (0..1) delayed by `late_delay_ms` instead.
    pub late_share: f64,
    /// Arrival delay of a late event.
    pub late_delay_ms: i64,
    /// Number of distinct accounts sessions are drawn from.
    pub accounts: u32,
    /// Number of distinct titles.
    pub titles: u32,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            seed: 1,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            session_interval_ms: 100,
            heartbeat_ms: 10_000,
            max_watch_ms: 10 * 60_000,
            disorder_ms: 2_000,
            late_share: 0.0,
            late_delay_ms: 5 * 60_000,
            accounts: 5_000,
            titles: 200,
        }
    }
}

impl GenOptions {
    /// Average number of events one session produces with these options.
    pub fn events_per_session(&self) -> f64 {
        (self.max_watch_ms as f64 / 2.0) / self.heartbeat_ms as f64 * 1.1 + 4.0
    }

    /// These options as live traffic: event times from `now_ms` on, about `rate` events per second.
    pub fn paced(mut self, rate: u32, now_ms: i64) -> Self {
        self.start_ms = now_ms;
        self.session_interval_ms =
            ((self.events_per_session() * 1000.0 / f64::from(rate.max(1))) as i64).max(1);
        self
    }
}

/// An event with the time it arrives at the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// When the event is sent, in generated time (event time plus its delay).
    pub arrival_ms: i64,
    pub event: PlaybackEvent,
}

impl Ord for Arrival {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.arrival_ms, &self.event.event_id).cmp(&(other.arrival_ms, &other.event.event_id))
    }
}

impl PartialOrd for Arrival {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// An endless iterator of events in arrival order.
pub struct Generator {
    options: GenOptions,
    rng: SmallRng,
    next_session: u64,
    next_start: i64,
    pending: BinaryHeap<Reverse<Arrival>>,
}

impl Generator {
    /// A generator with `options`.
    pub fn new(options: GenOptions) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(options.seed),
            next_session: 0,
            next_start: options.start_ms,
            pending: BinaryHeap::new(),
            options,
        }
    }

    fn spawn_session(&mut self) {
        let o = self.options.clone();
        let rng = &mut self.rng;
        let n = self.next_session;
        let start = self.next_start;
        self.next_session += 1;
        self.next_start += o.session_interval_ms;

        let account = rng.random_range(0..o.accounts);
        // Popular titles are watched far more often (a skewed, Zipf-like pick).
        let title = ((rng.random::<f64>().powi(3)) * f64::from(o.titles)) as u32;
        let (cdn, stall_p) = CDNS[rng.random_range(0..CDNS.len())];
        let duration = 20 * 60_000 + i64::from(title % 13) * 10 * 60_000;
        let mut s = Session {
            base: PlaybackEvent {
                event_id: String::new(),
                session_id: format!("s{:x}-{n}", o.seed),
                account_id: format!("acc-{account}"),
                profile_id: format!("acc-{account}-p{}", rng.random_range(0..3)),
                device_id: format!("dev-{account}-{}", rng.random_range(0..2)),
                device_type: DEVICES[rng.random_range(0..DEVICES.len())].into(),
                title_id: format!("title-{title}"),
                country: COUNTRIES[(account as usize * 7 + 3) % COUNTRIES.len()].into(),
                cdn: cdn.into(),
                event_type: EventType::Start,
                event_time: start,
                position_ms: if rng.random_bool(0.3) {
                    rng.random_range(0..duration / 2)
                } else {
                    0
                },
                duration_ms: Some(duration),
                play_ms: 0,
                rebuffer_ms: 0,
                startup_ms: None,
                bitrate_kbps: None,
                error_code: None,
            },
            seq: 0,
            events: Vec::new(),
        };
        s.emit(EventType::Start, start, 0, 0, |_| {});
        let roll: f64 = rng.random();
        if roll < 0.04 {
            let code = ERRORS[rng.random_range(0..ERRORS.len())];
            s.emit(
                EventType::Error,
                start + rng.random_range(500..6_000),
                0,
                0,
                |e| e.error_code = Some(code.into()),
            );
        } else if roll < 0.07 {
            s.emit(
                EventType::End,
                start + rng.random_range(1_000..10_000),
                0,
                0,
                |_| {},
            );
        } else {
            let startup = 300 + (-(1.0 - rng.random::<f64>()).ln() * 1_200.0) as i64;
            let startup = startup.min(20_000);
            let mut t = start + startup;
            let mut bitrate = [1_500, 3_000, 6_000][rng.random_range(0..3)];
            s.emit(EventType::Play, t, 0, 0, |e| {
                e.startup_ms = Some(startup);
                e.bitrate_kbps = Some(bitrate);
            });
            let end = t + rng.random_range(o.heartbeat_ms..=o.max_watch_ms.max(o.heartbeat_ms));
            while t < end {
                let step = o.heartbeat_ms.min(end - t).max(1);
                let r: f64 = rng.random();
                if r < stall_p {
                    let played = rng.random_range(0..step);
                    let stall = rng.random_range(300..6_000);
                    s.emit(EventType::RebufferStart, t + played, played, 0, |_| {});
                    s.emit(EventType::RebufferEnd, t + played + stall, 0, stall, |_| {});
                    t += played + stall;
                } else if r < stall_p + 0.02 {
                    let played = rng.random_range(0..step);
                    let paused = rng.random_range(1_000..60_000);
                    s.emit(EventType::Pause, t + played, played, 0, |_| {});
                    s.emit(EventType::Resume, t + played + paused, 0, 0, |_| {});
                    t += played + paused;
                } else if r < stall_p + 0.03 {
                    let jump = rng.random_range(-120_000..300_000);
                    s.emit(EventType::Seek, t + step, step, 0, |e| {
                        e.position_ms = (e.position_ms + jump).clamp(0, duration)
                    });
                    t += step;
                } else if r < stall_p + 0.08 {
                    bitrate = [1_500, 3_000, 6_000, 12_000][rng.random_range(0..4)];
                    s.emit(EventType::BitrateChange, t + step, step, 0, |e| {
                        e.bitrate_kbps = Some(bitrate)
                    });
                    t += step;
                } else {
                    s.emit(EventType::Heartbeat, t + step, step, 0, |_| {});
                    t += step;
                }
            }
            s.emit(EventType::End, t + rng.random_range(0..1_000), 0, 0, |_| {});
        }
        for event in s.events {
            let delay = if rng.random_bool(o.late_share.clamp(0.0, 1.0)) {
                o.late_delay_ms
            } else {
                rng.random_range(0..=o.disorder_ms)
            };
            self.pending.push(Reverse(Arrival {
                arrival_ms: event.event_time + delay,
                event,
            }));
        }
    }
}

impl Iterator for Generator {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        // A session's events arrive no earlier than it starts, so once the next start is past
        // the earliest pending arrival, that arrival is the next one overall.
        while self
            .pending
            .peek()
            .is_none_or(|Reverse(a)| a.arrival_ms >= self.next_start)
        {
            self.spawn_session();
        }
        self.pending.pop().map(|Reverse(a)| a)
    }
}

/// Builds one session's events in event-time order.
struct Session {
    base: PlaybackEvent,
    seq: u32,
    events: Vec<PlaybackEvent>,
}

impl Session {
    fn emit(
        &mut self,
        kind: EventType,
        t: i64,
        play_ms: i64,
        rebuffer_ms: i64,
        edit: impl FnOnce(&mut PlaybackEvent),
    ) {
        let mut e = self.base.clone();
        e.event_id = format!("{}-{}", e.session_id, self.seq);
        e.event_type = kind;
        e.event_time = t;
        e.play_ms = play_ms;
        e.rebuffer_ms = rebuffer_ms;
        e.position_ms += play_ms;
        edit(&mut e);
        // Position and rendition carry over to the session's next event.
        self.base.position_ms = e.position_ms;
        self.base.bitrate_kbps = e.bitrate_kbps;
        self.seq += 1;
        self.events.push(e);
    }
}

/// The partition of `key` among `partitions`: a stable hash, so tests know where each
/// session's events land.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    (crate::window::session_hash(key) % partitions as u64) as i32
}

/// Publishes generated events to Kafka as Confluent-framed Avro, keyed by session.
/// A partition for `key` that puts `hot_share` (0..1) of all keys on partition 0 and spreads
/// the rest over the others: a hot partition, whose event time advances slowest while a
/// backlog is read.
pub fn skewed_partition(key: &str, partitions: i32, hot_share: f64) -> i32 {
    let bucket = partition_for(key, 1_000);
    if partitions <= 1 || f64::from(bucket) < hot_share * 1_000.0 {
        0
    } else {
        1 + bucket % (partitions - 1)
    }
}

pub struct Publisher {
    producer: rdkafka::producer::ThreadedProducer<crate::io::sink::DeliveryTracker>,
    encoder: crate::io::sink::AvroEncoder,
    topic: String,
    partitions: Option<i32>,
}

impl Publisher {
    /// The topic written.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Registers the event schema as `<topic>-value`. With `partitions`, each session goes to
    /// [`partition_for`] its id; otherwise librdkafka's partitioner decides.
    pub fn new(
        brokers: &str,
        registry: &dyn crate::io::registry::SchemaRegistry,
        topic: &str,
        partitions: Option<i32>,
    ) -> Result<Self, crate::error::PipelineError> {
        let encoder = crate::io::sink::AvroEncoder::register(
            registry,
            &format!("{topic}-value"),
            crate::io::decode::PLAYBACK_EVENT_SCHEMA,
        )?;
        let producer = crate::io::sink::producer_config(brokers, &Default::default())
            .create_with_context(crate::io::sink::DeliveryTracker::default())
            .map_err(crate::error::PipelineError::kafka(
                "creating the generator's producer",
            ))?;
        Ok(Self {
            producer,
            encoder,
            topic: topic.to_string(),
            partitions,
        })
    }

    /// Sends one event (asynchronously).
    pub fn send(&self, event: &PlaybackEvent) -> Result<(), crate::error::PipelineError> {
        let partition = self.partitions.map(|n| partition_for(&event.session_id, n));
        self.send_to(event, partition)
    }

    /// Sends one event to `partition` (or where librdkafka's partitioner puts it).
    pub fn send_to(
        &self,
        event: &PlaybackEvent,
        partition: Option<i32>,
    ) -> Result<(), crate::error::PipelineError> {
        let value = self.encoder.encode(event)?;
        let mut record = rdkafka::producer::BaseRecord::to(&self.topic)
            .key(event.session_id.as_bytes())
            .payload(&value);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        crate::io::sink::send_with_backpressure(&self.producer, record)
    }

    /// Waits until everything sent is delivered; a refused event is an error here.
    pub fn flush(&self) -> Result<(), crate::error::PipelineError> {
        match crate::io::sink::flush_and_check(&self.producer)?.first() {
            None => Ok(()),
            Some(refused) => Err(crate::error::PipelineError::Other(format!(
                "the broker refused a generated event: {refused}"
            ))),
        }
    }
}

/// Sends up to `count` events from `generator` until `stop`. With `paced`, each event is sent
/// when the wall clock reaches its arrival time (`start_ms` maps to the moment of the call).
pub fn publish(
    publisher: &Publisher,
    generator: Generator,
    count: Option<u64>,
    paced: bool,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<u64, crate::error::PipelineError> {
    let started = std::time::Instant::now();
    let t0 = generator.options.start_ms;
    let mut sent = 0u64;
    let mut progress = crate::progress::Progress::new(
        format!("sending to {}", publisher.topic()),
        "events",
        count,
    );
    for arrival in generator {
        if stop.is_cancelled() || count.is_some_and(|c| sent >= c) {
            break;
        }
        if paced {
            let due = std::time::Duration::from_millis((arrival.arrival_ms - t0).max(0) as u64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        publisher.send(&arrival.event)?;
        sent += 1;
        if let Some(line) = progress.due(sent) {
            tracing::info!("{line}");
        }
    }
    publisher.flush()?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events_in_arrival_order() {
        let opts = GenOptions {
            late_share: 0.05,
            late_delay_ms: 30_000,
            ..GenOptions::default()
        };
        let a: Vec<_> = Generator::new(opts.clone()).take(2_000).collect();
        let b: Vec<_> = Generator::new(opts).take(2_000).collect();
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
        let kinds: std::collections::HashSet<_> = a.iter().map(|x| x.event.event_type).collect();
        for k in [
            EventType::Start,
            EventType::Play,
            EventType::Heartbeat,
            EventType::End,
            EventType::RebufferStart,
        ] {
            assert!(kinds.contains(&k), "{k:?} missing");
        }
        assert!(
            a.iter()
                .any(|x| x.arrival_ms - x.event.event_time >= 30_000),
            "late events"
        );
    }
}
