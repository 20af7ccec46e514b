//! Everything Marquee counts, one small type per thing, named
//! `marquee_<name>_<unit>[_total]` with bounded labels (topic, partition, reason, and the
//! values of low-cardinality dimensions only). Per-record counts are accumulated locally and
//! published once per batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::record::{DailyActive, QosWindow};

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&seconds)
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Counters of one input partition, accumulated per batch.
pub struct PartitionCounters {
    topic: String,
    partition: String,
    consumed: Counter,
    decoded: Counter,
    late: Counter,
    watermark: Gauge,
    watermark_lag: Gauge,
    lag: Gauge,
    paused: Gauge,
    pauses: Counter,
    seeks: Counter,
    idle: Gauge,
    pending: PendingCounts,
}

/// Counts not yet published.
#[derive(Default)]
struct PendingCounts {
    consumed: u64,
    decoded: u64,
    late: u64,
    dead: BTreeMap<&'static str, u64>,
}

impl PartitionCounters {
    /// Registers the series of `topic`/`partition`.
    pub fn new(topic: &str, partition: i32) -> Self {
        let labels = [
            ("topic", topic.to_string()),
            ("partition", partition.to_string()),
        ];
        Self {
            topic: topic.to_string(),
            partition: partition.to_string(),
            consumed: counter!("marquee_records_consumed_total", &labels),
            decoded: counter!("marquee_records_decoded_total", &labels),
            late: counter!("marquee_records_late_total", &labels),
            watermark: gauge!("marquee_watermark_timestamp_seconds", &labels),
            watermark_lag: gauge!("marquee_watermark_lag_seconds", &labels),
            lag: gauge!("marquee_consumer_lag_records", &labels),
            paused: gauge!("marquee_partition_paused", &labels),
            pauses: counter!("marquee_partition_pauses_total", &labels),
            seeks: counter!("marquee_partition_seeks_total", &labels),
            idle: gauge!("marquee_partition_idle", &labels),
            pending: PendingCounts::default(),
        }
    }

    /// One record read.
    pub fn consumed(&mut self) {
        self.pending.consumed += 1;
    }

    /// One record decoded into an event.
    pub fn decoded(&mut self) {
        self.pending.decoded += 1;
    }

    /// One late record sent to the late topic.
    pub fn late(&mut self) {
        self.pending.late += 1;
    }

    /// Watermark alignment paused the partition.
    pub fn paused_by_alignment(&mut self) {
        self.pauses.increment(1);
    }

    /// The broker skipped past the partition's position and it was sought back.
    pub fn sought_back(&mut self) {
        self.seeks.increment(1);
    }

    /// One record sent to the dead-letter topic for `reason`.
    pub fn dead_lettered(&mut self, reason: &'static str) {
        *self.pending.dead.entry(reason).or_default() += 1;
    }

    /// Publishes pending counts, the partition's time gauges and its consumer lag (records
    /// between the next offset and the broker's high watermark, when both are known).
    pub fn publish(
        &mut self,
        watermark_ms: i64,
        now_ms: i64,
        paused: bool,
        idle: bool,
        lag: Option<i64>,
    ) {
        let p = std::mem::take(&mut self.pending);
        self.consumed.increment(p.consumed);
        self.decoded.increment(p.decoded);
        self.late.increment(p.late);
        for (reason, n) in p.dead {
            counter!("marquee_records_dead_lettered_total",
                "topic" => self.topic.clone(), "partition" => self.partition.clone(), "reason" => reason)
            .increment(n);
        }
        if watermark_ms != i64::MIN {
            self.watermark.set(watermark_ms as f64 / 1000.0);
            self.watermark_lag
                .set((now_ms - watermark_ms) as f64 / 1000.0);
        }
        if let Some(lag) = lag {
            self.lag.set(lag.max(0) as f64);
        }
        self.paused.set(f64::from(u8::from(paused)));
        self.idle.set(f64::from(u8::from(idle)));
    }
}

/// Window lifecycle and state gauges.
pub fn windows_open(n: usize) {
    gauge!("marquee_windows_open").set(n as f64);
}

/// Sessions held by the session lifecycle (QoE), over owned partitions.
pub fn sessions_open(n: usize) {
    gauge!("marquee_sessions_open").set(n as f64);
}

/// Windows closed (all groups of one window start count once).
pub fn windows_closed(n: u64) {
    counter!("marquee_windows_closed_total").increment(n);
}

/// Result records written to the output topic.
pub fn results_emitted(n: u64) {
    counter!("marquee_window_results_emitted_total").increment(n);
}

/// Early (not final) result records written.
pub fn early_results_emitted(n: u64) {
    counter!("marquee_window_early_results_emitted_total").increment(n);
}

/// One output the broker refused because of the record itself (it was dead-lettered).
pub fn output_refused(topic: &str) {
    counter!("marquee_outputs_refused_total", "topic" => topic.to_string()).increment(1);
}

/// Approximate bytes of the state store.
pub fn state_size(bytes: u64) {
    gauge!("marquee_state_store_size_bytes").set(bytes as f64);
}

/// One checkpoint: how long flushing outputs and writing the batch took.
pub fn checkpoint(flush: Duration, write: Duration) {
    histogram!("marquee_output_flush_duration_seconds").record(flush.as_secs_f64());
    histogram!("marquee_checkpoint_write_duration_seconds").record(write.as_secs_f64());
}

/// Most values per dimension that get gauges; results hold every value regardless.
pub const MAX_GAUGE_VALUES: usize = 32;

/// Business gauges of the newest results, per low-cardinality group. A group without
/// data in the newest window (or day) reports 0 rather than its last value (so a CDN that
/// fails completely trips a viewer-drop alert), and at most [`MAX_GAUGE_VALUES`] values per
/// dimension are ever exported (the first seen), so hostile values cannot explode the series
/// count.
pub struct GroupGauges<R> {
    /// The groups shown and the last result each showed.
    shown: BTreeMap<(String, String), R>,
    set: fn(&R),
}

/// The QoS window gauges.
pub type LastWindowGauges = GroupGauges<QosWindow>;
/// The DAU gauges.
pub type DailyActiveGauges = GroupGauges<DailyActive>;

impl Default for LastWindowGauges {
    fn default() -> Self {
        Self {
            shown: BTreeMap::new(),
            set: set_last_window,
        }
    }
}

impl Default for DailyActiveGauges {
    fn default() -> Self {
        Self {
            shown: BTreeMap::new(),
            set: set_daily_active,
        }
    }
}

/// A result with gauges.
pub trait Grouped: Clone {
    /// The result's dimension and value.
    fn group(&self) -> (&str, &str);
    /// The same group with nothing measured.
    fn zeroed(&self) -> Self;
}

impl Grouped for QosWindow {
    fn group(&self) -> (&str, &str) {
        (&self.dimension, &self.value)
    }
    fn zeroed(&self) -> Self {
        let zero = |n: Option<i64>| n.map(|_| 0);
        QosWindow {
            dimension: self.dimension.clone(),
            value: self.value.clone(),
            attempts: zero(self.attempts),
            video_start_failures: zero(self.video_start_failures),
            exits_before_video_start: zero(self.exits_before_video_start),
            ..QosWindow::default()
        }
    }
}

impl Grouped for DailyActive {
    fn group(&self) -> (&str, &str) {
        (&self.dimension, &self.value)
    }
    fn zeroed(&self) -> Self {
        DailyActive {
            accounts: 0,
            profiles: 0,
            ..self.clone()
        }
    }
}

impl<R: Grouped> GroupGauges<R> {
    /// Publishes the newest results: every group shown before and not among them reports 0.
    pub fn publish(&mut self, newest: &[R]) {
        let fresh = self.update(newest);
        for (key, last) in self.shown.iter_mut() {
            if !fresh.contains(key) {
                *last = last.zeroed();
                (self.set)(last);
            }
        }
    }

    /// Publishes `changed` results of the period shown (a day's running values arrive in
    /// parts); the other groups keep their values. Returns the groups published.
    pub fn update(&mut self, changed: &[R]) -> BTreeSet<(String, String)> {
        let mut fresh = BTreeSet::new();
        for r in changed {
            let (dimension, value) = r.group();
            let key = (dimension.to_string(), value.to_string());
            if !self.shown.contains_key(&key) {
                let values = self.shown.keys().filter(|(d, _)| d == dimension).count();
                if values >= MAX_GAUGE_VALUES {
                    continue;
                }
            }
            (self.set)(r);
            self.shown.insert(key.clone(), r.clone());
            fresh.insert(key);
        }
        fresh
    }
}

fn set_last_window(r: &QosWindow) {
    let labels = [
        ("dimension", r.dimension.clone()),
        ("value", r.value.clone()),
    ];
    gauge!("marquee_qos_concurrent_viewers", &labels).set(r.concurrent_viewers as f64);
    gauge!("marquee_qos_rebuffer_ratio", &labels).set(r.rebuffer_ratio.unwrap_or(0.0));
    // QoE gauges exist only when the session lifecycle runs.
    let Some(attempts) = r.attempts else {
        return;
    };
    gauge!("marquee_qos_attempts", &labels).set(attempts as f64);
    let failures = r.video_start_failures.unwrap_or(0) as f64;
    gauge!("marquee_qos_video_start_failures", &labels).set(failures);
    let exits = r.exits_before_video_start.unwrap_or(0) as f64;
    gauge!("marquee_qos_exits_before_video_start", &labels).set(exits);
    for (q, v) in [
        ("0.5", r.startup_ms_p50),
        ("0.9", r.startup_ms_p90),
        ("0.99", r.startup_ms_p99),
    ] {
        let mut labels = labels.to_vec();
        labels.push(("quantile", q.to_string()));
        gauge!("marquee_qos_startup_ms", &labels).set(v.unwrap_or(0.0));
    }
    gauge!("marquee_qos_avg_bitrate_kbps", &labels).set(r.avg_bitrate_kbps.unwrap_or(0.0));
}

fn set_daily_active(r: &DailyActive) {
    let labels = [
        ("dimension", r.dimension.clone()),
        ("value", r.value.clone()),
    ];
    gauge!("marquee_daily_active_accounts", &labels).set(r.accounts as f64);
    gauge!("marquee_daily_active_profiles", &labels).set(r.profiles as f64);
}

/// The resume table's per-event counters, registered once (a lookup per event would cost
/// more than the update).
pub struct TableCounters {
    applied: Counter,
    out_of_date: Counter,
    suppressed: Counter,
}

impl Default for TableCounters {
    fn default() -> Self {
        Self {
            applied: counter!("marquee_table_updates_total", "outcome" => "applied"),
            out_of_date: counter!("marquee_table_updates_total", "outcome" => "out_of_date"),
            suppressed: counter!("marquee_table_emits_suppressed_total"),
        }
    }
}

impl TableCounters {
    /// One event applied to the table, or ignored as older than the entry.
    pub fn update(&self, applied: bool) {
        if applied {
            &self.applied
        } else {
            &self.out_of_date
        }
        .increment(1);
    }

    /// A pending output record was replaced by a newer value before the rate limit let it
    /// out.
    pub fn suppressed(&self) {
        self.suppressed.increment(1);
    }
}

/// Approximate number of entries in the resume table.
pub fn table_size(entries: u64) {
    gauge!("marquee_table_entries").set(entries as f64);
}

/// Partials of windows the merge had already emitted (a replay of phase one), deleted again.
pub fn stale_partials(n: u64) {
    counter!("marquee_merge_stale_partials_total").increment(n);
}

/// Changelog records a running restore still has to read.
pub fn restore_remaining(task: &'static str, records: i64) {
    gauge!("marquee_restore_remaining_records", "task" => task).set(records as f64);
}

/// Partitions rebuilt from the changelog topics.
pub fn restored(task: &'static str, records: u64, took: Duration) {
    counter!("marquee_restored_records_total", "task" => task).increment(records);
    gauge!("marquee_restore_duration_seconds", "task" => task).set(took.as_secs_f64());
}

/// The partitions whose standby copies `task` keeps now.
pub fn standby_partitions(task: &'static str, partitions: usize) {
    gauge!("marquee_standby_partitions", "task" => task).set(partitions as f64);
}

/// Changelog records applied to standby copies.
pub fn standby_applied(task: &'static str, records: u64) {
    counter!("marquee_standby_records_total", "task" => task).increment(records);
}

/// One table query answered.
pub fn query(route: &'static str, took: Duration) {
    histogram!("marquee_query_duration_seconds", "route" => route).record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: &str, viewers: i64) -> QosWindow {
        QosWindow {
            window_start: 0,
            window_end: 60_000,
            dimension: "cdn".into(),
            value: value.into(),
            concurrent_viewers: viewers,
            play_ms: 1,
            rebuffer_ms: 0,
            rebuffer_events: 0,
            rebuffer_ratio: Some(0.0),
            is_final: true,
            ..QosWindow::default()
        }
    }

    fn viewers(page: &str, value: &str) -> Option<f64> {
        let series =
            format!("marquee_qos_concurrent_viewers{{dimension=\"cdn\",value=\"{value}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_group_without_events_reports_zero_and_values_are_bounded() {
        let handle = install();
        let mut gauges = LastWindowGauges::default();
        gauges.publish(&[row("gauge-test-a", 7), row("gauge-test-b", 3)]);
        gauges.publish(&[row("gauge-test-b", 4)]);
        let page = handle.render();
        assert_eq!(
            viewers(&page, "gauge-test-a"),
            Some(0.0),
            "not its last value"
        );
        assert_eq!(viewers(&page, "gauge-test-b"), Some(4.0));
        let many: Vec<_> = (0..100)
            .map(|i| row(&format!("gauge-test-{i}"), 1))
            .collect();
        gauges.publish(&many);
        let page = handle.render();
        assert_eq!(viewers(&page, "gauge-test-20"), Some(1.0));
        assert_eq!(viewers(&page, "gauge-test-99"), None, "beyond the bound");
    }

    #[test]
    fn a_day_s_running_values_arrive_in_parts_without_zeroing_the_others() {
        let handle = install();
        let day = |value: &str, accounts: i64| DailyActive {
            dimension: "country".into(),
            value: value.into(),
            accounts,
            ..DailyActive::default()
        };
        let accounts = |page: &str, value: &str| {
            let series = format!(
                "marquee_daily_active_accounts{{dimension=\"country\",value=\"{value}\"}} "
            );
            page.lines()
                .find_map(|l| l.strip_prefix(&series))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let mut gauges = DailyActiveGauges::default();
        gauges.publish(&[day("dau-test-fr", 5), day("dau-test-de", 2)]);
        gauges.update(&[day("dau-test-de", 3)]);
        let page = handle.render();
        assert_eq!(
            accounts(&page, "dau-test-fr"),
            Some(5.0),
            "kept by a partial update"
        );
        assert_eq!(accounts(&page, "dau-test-de"), Some(3.0));
        gauges.publish(&[day("dau-test-de", 1)]);
        let page = handle.render();
        assert_eq!(
            accounts(&page, "dau-test-fr"),
            Some(0.0),
            "a new day starts at 0"
        );
    }
}
