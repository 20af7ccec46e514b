//! QoS windows: per tumbling window and group, concurrent viewers, play and rebuffer time,
//! rebuffer events and ratio; one final result per window and group once the operator
//! watermark passes its end plus grace. A record whose window its partition's watermark (or
//! an emitted window) has passed is late: it goes unchanged to the late topic.

use std::collections::BTreeMap;
use std::sync::Arc;

use rocksdb::WriteBatch;

use crate::config::{Dimension, QosConfig};
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
    /// Gauges of the newest closed window.
    gauges: metrics::LastWindowGauges,
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
        let mut emitted = 0;
        let last = closed.keys().next_back().copied();
        let mut newest = Vec::new();
        for (start, partial) in &closed {
            for result in partial.results(&self.spec, *start) {
                ctx.sink
                    .send_result(&self.results, &result.key(), &result, None, &[])?;
                emitted += 1;
                if let Some(hook) = self.on_result.as_mut() {
                    hook(&result);
                }
                if Some(*start) == last && self.gauge_slot(&result.dimension) {
                    newest.push(result);
                }
            }
        }
        self.gauges.publish(&newest);
        metrics::windows_closed(closed.len() as u64);
        metrics::results_emitted(emitted);
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
