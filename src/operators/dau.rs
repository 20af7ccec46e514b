//! Daily active users: distinct accounts and profiles per UTC day, overall and per country and
//! device type. A day is a window of one day with the same watermark, grace and lateness
//! rules as any window: a running (not final) value every `interval` of wall clock for each
//! day that changed, and the final value once the operator watermark passes midnight plus
//! grace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::Batch;

use crate::config::{Counting, DauConfig};
use crate::daily::{day_of, DayPartial, DAY_MS};
use crate::error::PipelineError;
use crate::io::sink::Output;
use crate::metrics;
use crate::runtime::{Context, Handled, Operator, Record};
use crate::state::{PartitionMeta, Store, DAU_FRONTIER};

/// The DAU operator.
pub struct DailyActiveUsers {
    exact: bool,
    grace: i64,
    interval: Duration,
    store: Arc<Store>,
    output: Output,
    /// Open days per owned input partition.
    parts: BTreeMap<i32, BTreeMap<i64, DayPartial>>,
    /// Highest operator watermark at which days were closed.
    closed_through: i64,
    /// Emitted days whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    /// Open days changed since running values were last written.
    changed: BTreeSet<i64>,
    last_running: Instant,
    gauges: metrics::DailyActiveGauges,
    /// The day the gauges show: an older day never replaces it.
    gauge_day: i64,
}

impl DailyActiveUsers {
    /// The operator of `dau`, writing to `output`.
    pub fn new(dau: &DauConfig, store: Arc<Store>, output: Output) -> Result<Self, PipelineError> {
        Ok(Self {
            exact: dau.counting == Counting::Exact,
            grace: dau.grace.as_millis() as i64,
            interval: dau.interval,
            closed_through: store.closed_through(DAU_FRONTIER)?.unwrap_or(i64::MIN),
            store,
            output,
            parts: BTreeMap::new(),
            emitted: Vec::new(),
            changed: BTreeSet::new(),
            last_running: Instant::now(),
            gauges: metrics::DailyActiveGauges::default(),
            gauge_day: i64::MIN,
        })
    }

    fn closes_at(&self, day: i64) -> i64 {
        day + DAY_MS + self.grace
    }

    /// Sends the results of `days` (merged over partitions) and points the gauges at the
    /// newest day.
    fn emit(
        &mut self,
        ctx: &Context<'_>,
        days: &BTreeMap<i64, DayPartial>,
        is_final: bool,
    ) -> Result<u64, PipelineError> {
        let mut sent = 0;
        for (&day, partial) in days {
            let results = partial.results(day, is_final);
            for r in &results {
                ctx.sink.send_result(&self.output, &r.key(), r, None, &[])?;
                sent += 1;
            }
            if day >= self.gauge_day {
                self.gauge_day = day;
                self.gauges.publish(&results);
            }
        }
        Ok(sent)
    }
}

impl Operator for DailyActiveUsers {
    fn name(&self) -> &'static str {
        "dau"
    }

    fn assign(&mut self, partition: i32, _: Option<&PartitionMeta>) -> Result<(), PipelineError> {
        let days = self.store.load_days(partition)?;
        self.parts.insert(partition, days);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    fn on_record(
        &mut self,
        _ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let day = day_of(record.event.event_time);
        let watermark = record.watermark.max(self.closed_through);
        if watermark >= self.closes_at(day) {
            return Ok(Handled::Late {
                window_start: day,
                watermark,
            });
        }
        if let Some(days) = self.parts.get_mut(&record.origin.partition) {
            days.entry(day).or_default().add(record.event, self.exact);
            self.changed.insert(day);
        }
        Ok(Handled::Applied)
    }

    /// Emits the final value of every day closed at `watermark`.
    fn on_watermark(&mut self, ctx: &Context<'_>, watermark: i64) -> Result<(), PipelineError> {
        let mut closed: BTreeMap<i64, DayPartial> = BTreeMap::new();
        for (&p, days) in self.parts.iter_mut() {
            while let Some(entry) = days.first_entry() {
                if watermark < *entry.key() + DAY_MS + self.grace {
                    break;
                }
                let (day, partial) = entry.remove_entry();
                closed.entry(day).or_default().merge(&partial);
                self.emitted.push((p, day));
            }
        }
        self.closed_through = self.closed_through.max(watermark);
        for day in closed.keys() {
            self.changed.remove(day);
        }
        if !closed.is_empty() {
            let sent = self.emit(ctx, &closed, true)?;
            metrics::results_emitted(sent);
        }
        Ok(())
    }

    /// Writes running values of the days that changed, every `interval`.
    fn on_tick(&mut self, ctx: &Context<'_>) -> Result<(), PipelineError> {
        if ctx.now.saturating_duration_since(self.last_running) < self.interval
            || self.changed.is_empty()
        {
            return Ok(());
        }
        self.last_running = ctx.now;
        let mut open: BTreeMap<i64, DayPartial> = BTreeMap::new();
        for days in self.parts.values() {
            for day in &self.changed {
                if let Some(partial) = days.get(day) {
                    open.entry(*day).or_default().merge(partial);
                }
            }
        }
        self.changed.clear();
        let sent = self.emit(ctx, &open, false)?;
        metrics::early_results_emitted(sent);
        Ok(())
    }

    fn stage(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        for (p, day) in self.emitted.drain(..) {
            self.store.stage_day_delete(batch, p, day)?;
        }
        for (&p, days) in self.parts.iter_mut() {
            self.store.stage_days(batch, p, days);
        }
        if self.closed_through != i64::MIN {
            self.store
                .stage_closed_through(batch, DAU_FRONTIER, self.closed_through);
        }
        Ok(())
    }
}
