//! Daily active users, phase one: per owned input partition, UTC day and group (overall, per
//! country and per device type), the distinct accounts and profiles with any accepted event.
//! What each partition gains goes to the internal partials topic at every checkpoint, and its
//! days' progress after it; the merge ([`crate::runtime::merge`]) unites the partitions' ids
//! and writes running values every `interval` and the final value once every input partition
//! has passed midnight plus grace. Distinct ids are not additive, so partials are sets (or
//! sketches), never counts (see [`crate::operators::partials`]).
//!
//! Days close here as windows do in [`crate::operators::qos`]: at the operator watermark of the
//! owned partitions, or the global one once all of them are idle. A record for a day its
//! partition has closed is late.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::{Counting, DauConfig};
use crate::daily::{day_of, DayPartial, DAY_MS};
use crate::error::PipelineError;
use crate::operators::partials::{
    day_part, partition_of, send_progress, PartialRecord, PartialsTopic, SentProgress,
};
use crate::operators::qos::GlobalWatermark;
use crate::runtime::{Context, Handled, Operator, Record};
use crate::state::Batch;
use crate::state::{PartitionMeta, Store, DAU_FRONTIER};

/// The DAU operator (phase one).
pub struct DailyActiveUsers {
    exact: bool,
    grace: i64,
    store: Arc<Store>,
    partials: PartialsTopic,
    global: GlobalWatermark,
    /// Open days per owned input partition.
    parts: BTreeMap<i32, BTreeMap<i64, DayPartial>>,
    /// Per owned partition, the highest watermark at which its days were closed.
    closed: BTreeMap<i32, i64>,
    /// The frontier of each partition the last checkpoint wrote: an unchanged one is not
    /// written (nor sent to the changelog) again.
    written: BTreeMap<i32, i64>,
    /// The frontier of a state directory written before frontiers were per partition.
    legacy_closed: i64,
    /// Closed days whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    progress: SentProgress,
}

impl DailyActiveUsers {
    /// The operator of `dau`, writing partials to `partials`, closing days no earlier than
    /// the `global` watermark.
    pub fn new(
        dau: &DauConfig,
        store: Arc<Store>,
        partials: PartialsTopic,
        global: GlobalWatermark,
    ) -> Result<Self, PipelineError> {
        Ok(Self {
            exact: dau.counting == Counting::Exact,
            grace: dau.grace.as_millis() as i64,
            legacy_closed: store.closed_through(DAU_FRONTIER)?.unwrap_or(i64::MIN),
            store,
            partials,
            global,
            parts: BTreeMap::new(),
            closed: BTreeMap::new(),
            written: BTreeMap::new(),
            emitted: Vec::new(),
            progress: SentProgress::new(),
        })
    }

    fn closes_at(&self, day: i64) -> i64 {
        day + DAY_MS + self.grace
    }

    /// Writes what partition `partition` gained on `day` since it last wrote.
    fn send_day(
        ctx: &Context<'_>,
        partials: &PartialsTopic,
        partition: i32,
        day: i64,
        partial: &mut DayPartial,
    ) -> Result<(), PipelineError> {
        for (slot, groups) in partial.groups.iter_mut().enumerate() {
            for (group, active) in groups.iter_mut() {
                for ids in active.take_unsent() {
                    let record = PartialRecord::Day {
                        day,
                        slot: slot as u8,
                        group: group.to_string(),
                        source: partition,
                        part: day_part(&ids),
                        ids: Some(Box::new(ids)),
                    };
                    let to = partition_of(day, slot as u8, group, partials.partitions);
                    let (key, value) = record.encode();
                    ctx.sink
                        .send_raw(&partials.topic, &key, value.as_deref(), to, None)?;
                }
            }
        }
        Ok(())
    }
}

impl Operator for DailyActiveUsers {
    fn name(&self) -> &'static str {
        "dau"
    }

    fn assign(&mut self, partition: i32, _: Option<&PartitionMeta>) -> Result<(), PipelineError> {
        let mut days = self.store.load_days(partition)?;
        // What was sent before is not known here: the merge's union makes sending it again
        // harmless.
        for partial in days.values_mut() {
            for active in partial.groups.iter_mut().flat_map(|g| g.values_mut()) {
                active.mark_all_unsent();
            }
        }
        self.parts.insert(partition, days);
        let closed = self
            .store
            .partition_frontier(DAU_FRONTIER, partition)?
            .unwrap_or(self.legacy_closed);
        self.closed.insert(partition, closed);
        self.written.insert(partition, closed);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.parts.remove(&partition);
        self.closed.remove(&partition);
        self.written.remove(&partition);
        self.progress.remove(&partition);
        self.emitted.retain(|(p, _)| *p != partition);
    }

    fn on_record(
        &mut self,
        _ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let day = day_of(record.event.event_time);
        let partition = record.origin.partition;
        let closed = self.closed.get(&partition).copied().unwrap_or(i64::MIN);
        let watermark = record.watermark.max(closed);
        if watermark >= self.closes_at(day) {
            return Ok(Handled::Late {
                window_start: day,
                watermark,
            });
        }
        if let Some(days) = self.parts.get_mut(&partition) {
            days.entry(day).or_default().add(record.event, self.exact);
        }
        Ok(Handled::Applied)
    }

    /// Closes every day closed at `watermark` (or the global one, once every owned partition
    /// is idle): its last ids go to the merge, then the partitions' progress.
    fn on_watermark(&mut self, ctx: &Context<'_>, watermark: i64) -> Result<(), PipelineError> {
        let quiet = ctx.partitions.iter().all(|m| m.idle);
        let watermark = if quiet {
            watermark.max(self.global.load(Ordering::Acquire))
        } else {
            watermark
        };
        let grace = self.grace;
        for (&p, days) in self.parts.iter_mut() {
            while let Some(mut entry) = days.first_entry() {
                let day = *entry.key();
                if watermark < day + DAY_MS + grace {
                    break;
                }
                Self::send_day(ctx, &self.partials, p, day, entry.get_mut())?;
                entry.remove();
                self.emitted.push((p, day));
            }
            let frontier = self.closed.entry(p).or_insert(i64::MIN);
            *frontier = (*frontier).max(watermark);
        }
        send_progress(
            ctx,
            &self.partials,
            &self.closed,
            &mut self.progress,
            |source, watermark, idle, closed_through| PartialRecord::DayProgress {
                source,
                watermark,
                idle,
                closed_through,
            },
        )
    }

    /// The open days' new ids go to the merge with every checkpoint (its running values).
    fn before_flush(&mut self, ctx: &Context<'_>, _all: bool) -> Result<(), PipelineError> {
        for (&p, days) in self.parts.iter_mut() {
            for (&day, partial) in days.iter_mut() {
                Self::send_day(ctx, &self.partials, p, day, partial)?;
            }
        }
        Ok(())
    }

    fn stage(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        for (p, day) in self.emitted.drain(..) {
            self.store.stage_day_delete(batch, p, day)?;
        }
        for (&p, days) in self.parts.iter_mut() {
            self.store.stage_days(batch, p, days);
        }
        for (&p, &closed) in self.closed.iter().filter(|(_, c)| **c != i64::MIN) {
            if self.written.insert(p, closed) != Some(closed) {
                self.store
                    .stage_partition_frontier(batch, DAU_FRONTIER, p, closed);
            }
        }
        Ok(())
    }
}
