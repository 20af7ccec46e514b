//! Topology files (`topologies/*.toml`): serde structs whose doc comments are the reference,
//! named defaults, and `validate()` that reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;

/// One pipeline: where events come from, how time works, what is computed and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Name of the pipeline; used for the default consumer group and in logs.
    pub name: String,
    /// The input topic and consumer settings.
    pub source: SourceConfig,
    /// Event-time rules: watermarks, idleness, clock skew.
    #[serde(default)]
    pub time: TimeConfig,
    /// The tumbling QoS windows (optional: a topology may run only the resume table).
    pub qos: Option<QosConfig>,
    /// The resume-position table (optional).
    pub resume: Option<ResumeConfig>,
    /// Daily active accounts and profiles (optional).
    pub dau: Option<DauConfig>,
    /// Output topics and producer settings.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Local RocksDB state.
    pub state: StateConfig,
    /// Delivery guarantee of the outputs.
    #[serde(default)]
    pub processing: ProcessingConfig,
}

/// `[processing]`: the delivery guarantee.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingConfig {
    /// `at_least_once` (any Kafka-API broker: a crash may re-emit identical keyed records) or
    /// `exactly_once` (Kafka transactions: each checkpoint's outputs and input offsets commit
    /// together, so a `read_committed` consumer sees every record once).
    #[serde(default)]
    pub guarantee: Guarantee,
}

/// The delivery guarantee of a topology's outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "runtime", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// `[source]`: the input topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Topic of Avro `PlaybackEvent`s in the Confluent wire format.
    #[serde(default = "default_input_topic")]
    pub topic: String,
    /// Consumer group; every instance of this pipeline uses the same one. Default `marquee-<name>`.
    pub group_id: Option<String>,
    /// Extra librdkafka consumer properties, passed through unchanged (they win over defaults).
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

/// `[time]`: watermarks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// How far behind the largest event time seen on a partition its watermark trails.
    #[serde(default = "d5s", deserialize_with = "duration")]
    pub out_of_orderness: Duration,
    /// A partition that is caught up (the consumer has read all the broker holds) and has had
    /// no records for this long stops holding the operator watermark back.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Events whose event time is further than this ahead of their Kafka timestamp are
    /// quarantined to the dead-letter topic instead of moving any watermark. With `[qos]` it
    /// must stay below `out_of_orderness + qos.grace`: a bound the watermark can absorb, so one
    /// fast clock never makes other viewers' on-time records late.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub max_future_skew: Duration,
    /// A partition whose watermark runs this far ahead of the slowest owned partition with
    /// records to read is paused until the others are within half of it (watermark alignment),
    /// which bounds open-window state while a backlog is read; it never changes results.
    #[serde(default = "d10m", deserialize_with = "duration")]
    pub max_partition_drift: Duration,
}

impl Default for TimeConfig {
    fn default() -> Self {
        Self {
            out_of_orderness: d5s(),
            idle_timeout: d30s(),
            max_future_skew: d30s(),
            max_partition_drift: d10m(),
        }
    }
}

/// A grouping dimension of the QoS windows (the group `all` is always computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Cdn,
    Country,
    DeviceType,
    TitleId,
}

impl Dimension {
    /// The name used in output records, keys and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Cdn => "cdn",
            Dimension::Country => "country",
            Dimension::DeviceType => "device_type",
            Dimension::TitleId => "title_id",
        }
    }
}

/// `[qos]`: tumbling or hopping windows of QoS metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    /// Window size; windows are aligned to the epoch, `[k*advance, k*advance + window)`.
    #[serde(default = "d1m", deserialize_with = "duration")]
    pub window: Duration,
    /// A window starts every `advance` (hopping windows, e.g. 5m every 1m: smooth dashboard
    /// lines); unset for tumbling windows. Must divide `window`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub advance: Option<Duration>,
    /// How long after its end (in watermark time) a window still accepts records.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub grace: Duration,
    /// Grouping dimensions besides `all`.
    #[serde(default = "default_dimensions")]
    pub dimensions: Vec<Dimension>,
    /// Dimensions whose newest results are exported as Prometheus gauges. Must be
    /// low-cardinality: `title_id` is refused so it can never explode the series count.
    #[serde(default = "default_dimensions")]
    pub gauge_dimensions: Vec<Dimension>,
    /// `final`: one result per window and group, at close. `early`: also an updated result
    /// (`is_final = false`) every `early_interval` of wall clock while the window is open.
    #[serde(default)]
    pub emit: EmitPolicy,
    /// How often early results are written for windows that changed.
    #[serde(default = "d10s", deserialize_with = "duration")]
    pub early_interval: Duration,
    /// The session lifecycle's QoE fields (attempts, start failures, exits before start,
    /// startup percentiles, average bitrate); off leaves them null.
    #[serde(default = "yes")]
    pub qoe: bool,
    /// A session with no event for this long (in event time) is over: its state is dropped
    /// and a later event of the same `session_id` begins a new session. At least
    /// `time.out_of_orderness + qos.window + qos.grace`.
    #[serde(default = "d30m", deserialize_with = "duration")]
    pub session_timeout: Duration,
}

/// When window results are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmitPolicy {
    /// Once, when the window closes.
    #[default]
    Final,
    /// Updated while the window is open (not final), then once final.
    Early,
}

/// `[dau]`: distinct accounts and profiles per UTC day, overall and per country and device
/// type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DauConfig {
    /// Compacted topic of `DailyActive` records keyed `<dimension>/<value>/<day start>`.
    #[serde(default = "default_dau_topic")]
    pub topic: String,
    /// `exact` (a set of 64-bit id hashes per day and group: memory grows with the users) or
    /// `sketch` (HyperLogLog++, 12 KiB per day and group, standard error 0.81%).
    #[serde(default)]
    pub counting: Counting,
    /// How often a running (not final) value is written for each day that changed.
    #[serde(default = "d1m", deserialize_with = "duration")]
    pub interval: Duration,
    /// How long after midnight (in watermark time) a day still accepts records.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub grace: Duration,
}

/// How distinct ids are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Counting {
    /// Exactly (up to 64-bit hash collisions).
    #[default]
    Exact,
    /// With a mergeable cardinality sketch.
    Sketch,
}

/// `[resume]`: per (profile, title), the playhead of the newest event by event time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeConfig {
    /// Compacted topic of `ResumePosition` records keyed `<profile_id>/<title_id>`.
    #[serde(default = "default_resume_topic")]
    pub topic: String,
    /// Internal topic carrying the input re-keyed by profile_id (one owner per table entry).
    /// Default `<name>-resume-by-profile`.
    pub repartition_topic: Option<String>,
    /// Set when the input is already keyed by profile_id: the repartition step is skipped.
    #[serde(default)]
    pub input_keyed_by_profile: bool,
    /// Partitions of the repartition and resume topics when Marquee creates them; the table's
    /// partitions are theirs.
    #[serde(default = "default_table_partitions")]
    pub partitions: i32,
    /// A title is completed once position / duration reaches this.
    #[serde(default = "default_completion")]
    pub completion_threshold: f64,
    /// At most one output record per key per interval; the latest value wins.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub emit_interval: Duration,
    /// Entries without an update for this long (in event time) are deleted with a tombstone.
    #[serde(default = "d90d", deserialize_with = "duration")]
    pub retention: Duration,
    /// Longest a restore of table partitions from their changelog may take; a restore that
    /// cannot reach the changelog's end in time fails the instance instead of serving a table
    /// with entries missing.
    #[serde(default = "d10m", deserialize_with = "duration")]
    pub restore_timeout: Duration,
}

impl ResumeConfig {
    /// The repartition topic for a topology named `name`.
    pub fn repartition_topic(&self, name: &str) -> String {
        self.repartition_topic
            .clone()
            .unwrap_or_else(|| format!("{name}-resume-by-profile"))
    }
}

/// `[sink]`: where results, late records and undecodable records go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Topic of final `QosWindow` records (Confluent-framed Avro).
    #[serde(default = "default_output_topic")]
    pub topic: String,
    /// Topic receiving late records unchanged, with `marquee.*` headers.
    #[serde(default = "default_late_topic")]
    pub late_topic: String,
    /// Topic receiving undecodable or untrusted records unchanged, with `marquee.*` headers.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Partitions of the result, late and dead-letter topics when Marquee creates them;
    /// default: the broker's `num.partitions`. (The resume topics use `resume.partitions`.)
    pub partitions: Option<i32>,
    /// Replicas of every topic Marquee creates; default: the broker's
    /// `default.replication.factor`, so a multi-broker cluster never gets single-replica
    /// topics by accident.
    pub replication_factor: Option<i32>,
    /// Extra librdkafka producer properties, passed through unchanged.
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            topic: default_output_topic(),
            late_topic: default_late_topic(),
            dead_letter_topic: default_dead_letter_topic(),
            partitions: None,
            replication_factor: None,
            kafka: BTreeMap::new(),
        }
    }
}

/// `[state]`: the local RocksDB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the RocksDB database (created if missing).
    pub dir: PathBuf,
    /// How often state, watermarks and offsets are written in one batch (and outputs flushed).
    #[serde(default = "d1s", deserialize_with = "duration")]
    pub checkpoint_interval: Duration,
    /// One block cache shared by every store, in MiB.
    #[serde(default = "default_cache_mib")]
    pub block_cache_mib: usize,
    /// One write-buffer budget shared by every store, in MiB.
    #[serde(default = "default_write_buffer_mib")]
    pub write_buffer_mib: usize,
    /// Warm copies of each partition's state kept on other instances, so a partition that
    /// moves restores only what its copy has not applied yet (Kafka Streams'
    /// `num.standby.replicas`).
    #[serde(default)]
    pub standby_replicas: usize,
}

impl QosConfig {
    fn validate(&self, check: &mut impl FnMut(bool, String)) {
        let window = self.window.as_millis();
        check(
            window >= 1,
            format!("`qos.window` is {window}ms: expected at least 1ms"),
        );
        check(
            window == 0 || 86_400_000 % window == 0,
            format!("`qos.window` is {window}ms: expected a size that divides a day evenly (e.g. 10s, 1m, 5m, 1h)"),
        );
        if self.emit == EmitPolicy::Early {
            let every = self.early_interval.as_millis();
            check(
                every >= 100,
                format!("`qos.early_interval` is {every}ms: expected at least 100ms"),
            );
        }
        if let Some(advance) = self.advance.map(|a| a.as_millis()) {
            check(
                advance >= 1 && advance <= window && window % advance == 0,
                format!(
                    "`qos.advance` is {advance}ms: expected a step that divides `qos.window` ({window}ms) evenly, e.g. 1m for 5m windows"
                ),
            );
            check(
                advance == 0 || window / advance <= 60,
                format!(
                    "`qos.advance` is {advance}ms: each event would join {} windows; expected at most 60 (a larger advance or a smaller window)",
                    window / advance.max(1)
                ),
            );
        }
        for dim in &self.gauge_dimensions {
            check(
                *dim != Dimension::TitleId,
                "`qos.gauge_dimensions` contains `title_id`: expected low-cardinality dimensions only (cdn, country, device_type)".into(),
            );
            check(
                self.dimensions.contains(dim),
                format!(
                    "`qos.gauge_dimensions` contains `{}`, which is not in `qos.dimensions`",
                    dim.name()
                ),
            );
        }
        let mut seen = self.dimensions.clone();
        seen.sort();
        seen.dedup();
        check(
            seen.len() == self.dimensions.len(),
            "`qos.dimensions` lists a dimension twice".into(),
        );
    }
}

impl Topology {
    /// Reads, parses and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates topology text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Topology, ConfigError> {
        let topology: Topology = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let problems = topology.validate();
        if problems.is_empty() {
            Ok(topology)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                problems,
            })
        }
    }

    /// Every semantic problem, each naming its key, the value and what was expected.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg)
            }
        };
        check(
            !self.name.trim().is_empty(),
            "`name` must not be empty".into(),
        );
        check(
            !self.source.topic.is_empty(),
            "`source.topic` must not be empty".into(),
        );
        check(
            self.qos.is_some() || self.resume.is_some() || self.dau.is_some(),
            "the topology has none of `[qos]`, `[resume]` and `[dau]`: expected at least one operator"
                .into(),
        );
        if let Some(dau) = &self.dau {
            check(
                dau.interval >= Duration::from_secs(1),
                format!(
                    "`dau.interval` is {}: expected at least 1s",
                    humantime::format_duration(dau.interval)
                ),
            );
            check(
                dau.topic != self.source.topic && !dau.topic.is_empty(),
                format!(
                    "`dau.topic` is `{}`: expected a topic other than the input",
                    dau.topic
                ),
            );
            let absorbed = self.time.out_of_orderness + dau.grace;
            check(
                self.time.max_future_skew < absorbed,
                format!(
                    "`time.max_future_skew` is {}: expected less than `time.out_of_orderness` + `dau.grace` = {}",
                    humantime::format_duration(self.time.max_future_skew),
                    humantime::format_duration(absorbed)
                ),
            );
        }
        if let Some(qos) = &self.qos {
            qos.validate(&mut check);
            if qos.qoe {
                let ms = |d: Duration| d.as_millis() as i64;
                if let Err(expected) = crate::session::check_timeout(
                    ms(qos.session_timeout),
                    ms(self.time.out_of_orderness),
                    ms(qos.window),
                    ms(qos.grace),
                ) {
                    check(
                        false,
                        format!(
                            "`qos.session_timeout` is {}: {expected}",
                            humantime::format_duration(qos.session_timeout)
                        ),
                    );
                }
            }
            let absorbed = self.time.out_of_orderness + qos.grace;
            check(
                self.time.max_future_skew < absorbed,
                format!(
                    "`time.max_future_skew` is {}, which defeats the grace: an event that far \
                     ahead would make on-time records late; expected less than \
                     `time.out_of_orderness` + `qos.grace` = {}",
                    humantime::format_duration(self.time.max_future_skew),
                    humantime::format_duration(absorbed)
                ),
            );
        }
        if let Some(resume) = &self.resume {
            let t = resume.completion_threshold;
            check(
                t > 0.0 && t <= 1.0,
                format!(
                    "`resume.completion_threshold` is {t}: expected a share in (0, 1], e.g. 0.95"
                ),
            );
            check(
                resume.partitions >= 1,
                format!(
                    "`resume.partitions` is {}: expected at least 1",
                    resume.partitions
                ),
            );
            check(
                !resume.retention.is_zero(),
                "`resume.retention` must be greater than 0".into(),
            );
            check(
                !resume.restore_timeout.is_zero(),
                "`resume.restore_timeout` must be greater than 0".into(),
            );
            let repartition = resume.repartition_topic(&self.name);
            for (key, topic) in [
                ("resume.topic", &resume.topic),
                ("resume.repartition_topic", &repartition),
            ] {
                check(
                    *topic != self.source.topic,
                    format!("`{key}` is `{topic}`, the input topic: expected a different topic"),
                );
            }
        }
        check(
            !self.time.idle_timeout.is_zero(),
            "`time.idle_timeout` must be greater than 0".into(),
        );
        check(
            !self.time.max_partition_drift.is_zero(),
            "`time.max_partition_drift` must be greater than 0".into(),
        );
        check(
            !self.state.checkpoint_interval.is_zero(),
            "`state.checkpoint_interval` must be greater than 0".into(),
        );
        let topics = [
            ("sink.topic", &self.sink.topic),
            ("sink.late_topic", &self.sink.late_topic),
            ("sink.dead_letter_topic", &self.sink.dead_letter_topic),
        ];
        for (key, topic) in topics {
            check(!topic.is_empty(), format!("`{key}` must not be empty"));
            check(
                *topic != self.source.topic,
                format!("`{key}` is `{topic}`, the input topic: expected a different topic"),
            );
        }
        for (key, value) in [
            ("sink.partitions", self.sink.partitions),
            ("sink.replication_factor", self.sink.replication_factor),
        ] {
            check(
                value.is_none_or(|v| v >= 1),
                format!("`{key}` is {value:?}: expected at least 1 (or leave it out for the broker's default)"),
            );
        }
        check(
            self.state.block_cache_mib > 0 && self.state.write_buffer_mib > 0,
            "`state.block_cache_mib` and `state.write_buffer_mib` must be greater than 0".into(),
        );
        problems
    }

    /// The consumer group: `source.group_id`, or `marquee-<name>`.
    pub fn group_id(&self) -> String {
        self.source
            .group_id
            .clone()
            .unwrap_or_else(|| format!("marquee-{}", self.name))
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h 30m` into a `Duration`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "invalid duration {text:?} ({e}): expected a number and unit such as 500ms, 30s, 5m"
        )
    })
}

fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn d10s() -> Duration {
    Duration::from_secs(10)
}

fn optional_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    duration(de).map(Some)
}

fn default_input_topic() -> String {
    "playback-events".into()
}
fn default_output_topic() -> String {
    "qos-windows".into()
}
fn default_late_topic() -> String {
    "qos-late".into()
}
fn default_dead_letter_topic() -> String {
    "qos-dead-letter".into()
}
fn default_dimensions() -> Vec<Dimension> {
    vec![Dimension::Cdn, Dimension::Country, Dimension::DeviceType]
}
fn default_dau_topic() -> String {
    "daily-active".into()
}
fn default_resume_topic() -> String {
    "resume-positions".into()
}
fn default_table_partitions() -> i32 {
    4
}
fn default_completion() -> f64 {
    0.95
}
fn d90d() -> Duration {
    Duration::from_secs(90 * 86_400)
}
fn default_cache_mib() -> usize {
    128
}
fn default_write_buffer_mib() -> usize {
    64
}
fn d1s() -> Duration {
    Duration::from_secs(1)
}
fn d5s() -> Duration {
    Duration::from_secs(5)
}
fn d30s() -> Duration {
    Duration::from_secs(30)
}
fn yes() -> bool {
    true
}
fn d30m() -> Duration {
    Duration::from_secs(1800)
}
fn d1m() -> Duration {
    Duration::from_secs(60)
}
fn d10m() -> Duration {
    Duration::from_secs(600)
}
