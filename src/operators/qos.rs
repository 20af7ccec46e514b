//! QoS windows: per window (tumbling or hopping) and group, concurrent viewers, play and
//! rebuffer time, rebuffer events and ratio; one final result per window and group once the
//! operator watermark passes its end plus grace, and with the `early` policy an updated,
//! not-final result every `early_interval` of wall clock for each window that changed. A
//! record whose window its partition's watermark (or an emitted window) has passed is late: it
//! goes unchanged to the late topic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::WriteBatch;

use crate::config::{Dimension, EmitPolicy, QosConfig};
use crate::error::PipelineError;
use crate::io::sink::Output;
use crate::metrics;
use crate::record::QosWindow;
use crate::runtime::{Context, Handled, Operator, Record};
use crate::state::PartitionMeta;
use crate::state::Store;
use crate::window::{slot, slot_name, PartitionWindows, WindowPartial, WindowSpec};

/// Called with every final result as it is emitted (the demo prints them).
pub type ResultHook = Box<dyn FnMut(&QosWindow) + Send>;

/// The QoS window operator.
pub struct QosWindows {
    spec: WindowSpec,
    dimensions: Vec<Dimension>,
    gauge_slots: Vec<u8>,
    store: Arc<Store>,
    results: Output,
    late_topic: String,
    /// Open windows per owned input partition.
    parts: BTreeMap<i32, PartitionWindows>,
    /// Highest operator watermark at which windows were closed: anything at or below is final.
    closed_through: i64,
    /// Emitted windows whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    on_result: Option<ResultHook>,
    /// Gauges of the newest window with results.
    gauges: metrics::LastWindowGauges,
    /// Start of the window the gauges show: an older window's results never replace them.
    gauge_window: i64,
    /// The `early` policy's interval; `None` for `final`.
    early_interval: Option<Duration>,
    /// When early results were last written.
    last_early: Instant,
    /// Open windows changed since early results were last written.
    changed: BTreeSet<i64>,
}

impl QosWindows {
    /// The operator of `qos`, writing results to `results` and late records to `late_topic`.
    pub fn new(
        qos: &QosConfig,
        store: Arc<Store>,
        results: Output,
        late_topic: &str,
    ) -> Result<Self, PipelineError> {
        Ok(Self {
            spec: WindowSpec::new(qos.window, qos.advance.unwrap_or(qos.window), qos.grace),
            dimensions: qos.dimensions.clone(),
            gauge_slots: qos.gauge_dimensions.iter().map(|d| slot(*d)).collect(),
            closed_through: store.closed_through()?.unwrap_or(i64::MIN),
            store,
            results,
            late_topic: late_topic.to_string(),
            parts: BTreeMap::new(),
            emitted: Vec::new(),
            on_result: None,
            gauges: metrics::LastWindowGauges::default(),
            gauge_window: i64::MIN,
            early_interval: (qos.emit == EmitPolicy::Early).then_some(qos.early_interval),
            last_early: Instant::now(),
            changed: BTreeSet::new(),
        })
    }

    /// Calls `hook` with every final result as it is emitted.
    pub fn on_result(mut self, hook: Option<ResultHook>) -> Self {
        self.on_result = hook;
        self
    }

    fn gauge_slot(&self, dimension: &str) -> bool {
        dimension == "all" || self.gauge_slots.iter().any(|&s| slot_name(s) == dimension)
    }

    /// Sends the results of each window in `windows` (merged over partitions), and points
    /// the gauges at the newest one unless they already show a newer window.
    fn emit(
        &mut self,
        ctx: &Context<'_>,
        windows: &BTreeMap<i64, WindowPartial>,
        is_final: bool,
    ) -> Result<u64, PipelineError> {
        let mut emitted = 0;
        let newest = windows.keys().next_back().copied();
        let mut gauges = Vec::new();
        for (start, partial) in windows {
            for result in partial.results(&self.spec, *start, is_final) {
                ctx.sink
                    .send_result(&self.results, &result.key(), &result, None, &[])?;
                emitted += 1;
                if let Some(hook) = self.on_result.as_mut().filter(|_| is_final) {
                    hook(&result);
                }
                if Some(*start) == newest && self.gauge_slot(&result.dimension) {
                    gauges.push(result);
                }
            }
        }
        if let Some(start) = newest.filter(|s| *s >= self.gauge_window) {
            self.gauge_window = start;
            self.gauges.publish(&gauges);
        }
        Ok(emitted)
    }
}

impl Operator for QosWindows {
    fn name(&self) -> &'static str {
        "qos"
    }

    fn assign(
        &mut self,
        partition: i32,
        _checkpoint: Option<&PartitionMeta>,
    ) -> Result<(), PipelineError> {
        let windows = self.store.load_windows(partition)?;
        tracing::debug!(
            partition,
            open_windows = windows.windows.len(),
            "QoS windows restored"
        );
        self.parts.insert(partition, windows);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    fn on_record(
        &mut self,
        ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let start = self.spec.first_start(record.event.event_time);
        let watermark = record.watermark.max(self.closed_through);
        if self.spec.is_closed(start, watermark) {
            ctx.sink.send_late(
                &self.late_topic,
                record.key,
                record.value,
                record.origin,
                start,
                watermark,
            )?;
            return Ok(Handled::Late);
        }
        if let Some(windows) = self.parts.get_mut(&record.origin.partition) {
            windows.add(&self.spec, &self.dimensions, record.event);
            if self.early_interval.is_some() {
                self.changed
                    .extend(self.spec.starts(record.event.event_time));
            }
        }
        Ok(Handled::Applied)
    }

    /// Merges and emits every window closed at operator watermark `watermark`.
    fn on_watermark(&mut self, ctx: &Context<'_>, watermark: i64) -> Result<(), PipelineError> {
        let mut closed: BTreeMap<i64, WindowPartial> = BTreeMap::new();
        for (&p, windows) in self.parts.iter_mut() {
            for (start, partial) in windows.take_closed(&self.spec, watermark) {
                closed.entry(start).or_default().merge(&partial);
                self.emitted.push((p, start));
            }
        }
        self.closed_through = self.closed_through.max(watermark);
        let open: usize = self.parts.values().map(|w| w.windows.len()).sum();
        metrics::windows_open(open);
        if closed.is_empty() {
            return Ok(());
        }
        for start in closed.keys() {
            self.changed.remove(start);
        }
        let emitted = self.emit(ctx, &closed, true)?;
        metrics::windows_closed(closed.len() as u64);
        metrics::results_emitted(emitted);
        Ok(())
    }

    /// With the `early` policy, writes not-final results of the open windows that changed.
    fn on_tick(&mut self, ctx: &Context<'_>) -> Result<(), PipelineError> {
        let Some(interval) = self.early_interval else {
            return Ok(());
        };
        if ctx.now.saturating_duration_since(self.last_early) < interval {
            return Ok(());
        }
        self.last_early = ctx.now;
        let mut open: BTreeMap<i64, WindowPartial> = BTreeMap::new();
        for windows in self.parts.values() {
            for start in &self.changed {
                if let Some(partial) = windows.windows.get(start) {
                    open.entry(*start).or_default().merge(partial);
                }
            }
        }
        self.changed.clear();
        let emitted = self.emit(ctx, &open, false)?;
        metrics::early_results_emitted(emitted);
        Ok(())
    }

    fn stage(&mut self, batch: &mut WriteBatch) -> Result<(), PipelineError> {
        for (p, start) in self.emitted.drain(..) {
            self.store.stage_window_delete(batch, p, start);
        }
        for (&p, windows) in self.parts.iter_mut() {
            self.store.stage_windows(batch, p, windows);
        }
        if self.closed_through != i64::MIN {
            self.store.stage_closed_through(batch, self.closed_through);
        }
        Ok(())
    }
}
