//! Phase two of the QoS and DAU aggregations: the merge task. It reads the internal partials
//! topic in its own consumer group, so each window (or day) and group has exactly one owner
//! among the instances, and emits a window's (day's) results once every input partition's
//! progress says its owner has closed it: never on the set of partitions one instance happens
//! to own. Windows add their partitions' aggregates up; days unite their partitions' ids.
//!
//! Its state lives in the compacted partials topic itself (see [`crate::operators::partials`]):
//! an assigned partition is read from its beginning, the merge deletes a window's partials
//! after emitting it and records its frontier there, so a new owner (or a restart) rebuilds
//! exactly what is still open. With exactly-once, each checkpoint's results, deletions and
//! frontier are one Kafka transaction, fenced by the merge group's generation.
//!
//! It also computes the global watermark (the minimum over every input partition that is not
//! idle) that phase one closes windows at when its own partitions are all quiet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;

use crate::daily::{Active, DayPartial, DAY_MS};
use crate::error::PipelineError;
use crate::io::sink::{Output, Sink};
use crate::io::source::{Assignment, Source};
use crate::metrics;
use crate::operators::partials::PartialRecord;
use crate::operators::qos::{GlobalWatermark, ResultHook};
use crate::record::DailyActive;
use crate::serve::http::Health;
use crate::window::{slot_name, GroupAgg, WindowPartial, WindowSpec};

/// Name of the merge in `/readyz`.
pub const MERGE_TASK: &str = "merge";
/// How often windows are checked for closing and the global watermark recomputed.
const TICK: Duration = Duration::from_millis(100);

/// What the merge needs to know of the topology.
pub struct MergeOptions {
    /// The internal partials topic.
    pub topic: String,
    /// Number of input partitions: a window closes once all of them have closed it.
    pub sources: i32,
    pub checkpoint_interval: Duration,
    /// The QoS windows, when the topology has them.
    pub windows: Option<WindowMerge>,
    /// The DAU days, when the topology has them.
    pub days: Option<DayMerge>,
}

/// The QoS side of the merge.
pub struct WindowMerge {
    pub spec: WindowSpec,
    pub qoe: bool,
    /// Dimension slots with gauges (besides `all`).
    pub gauge_slots: Vec<u8>,
    /// The `early` policy's interval; `None` for `final`.
    pub early_interval: Option<Duration>,
    /// The QoS results topic.
    pub results: Output,
}

/// The DAU side of the merge.
pub struct DayMerge {
    /// How long after midnight (event time) a day stays open, in milliseconds.
    pub grace: i64,
    /// How often running values of the open days that changed are written.
    pub interval: Duration,
    /// The DAU topic.
    pub output: Output,
}

/// A source partition's last progress record.
#[derive(Debug, Clone, Copy)]
struct Progress {
    watermark: i64,
    idle: bool,
    closed_through: i64,
}

/// Open windows of one window start: each group's partial per source partition.
type Groups = BTreeMap<(u8, Box<str>), BTreeMap<i32, GroupAgg>>;

/// The groups of one open day.
type DayGroups = BTreeMap<(u8, Box<str>), DayGroup>;

/// One group of an open day: the union of every partition's ids, and which records they came
/// in (deleted once the day is emitted).
struct DayGroup {
    ids: Active,
    records: BTreeSet<(i32, u64)>,
}

/// The merge state of one partition of the partials topic.
#[derive(Default)]
struct MergePartition {
    windows: BTreeMap<i64, Groups>,
    progress: BTreeMap<i32, Progress>,
    /// Every window closed at this watermark was emitted.
    frontier: Option<i64>,
    /// Open windows changed since early results were last written.
    changed: BTreeSet<i64>,
    /// The partition was read to its end since it was assigned: before that, a window whose
    /// frontier record is still ahead may look open, so nothing is emitted.
    rebuilt: bool,
    days: BTreeMap<i64, DayGroups>,
    day_progress: BTreeMap<i32, Progress>,
    /// Every day closed at this watermark was emitted.
    day_frontier: Option<i64>,
    /// Open days changed since running values were last written.
    days_changed: BTreeSet<i64>,
}

impl MergePartition {
    /// Applies one record; returns the tombstone owed when it is a replay of something
    /// already emitted.
    fn apply(
        &mut self,
        spec: Option<&WindowSpec>,
        day_grace: i64,
        record: PartialRecord,
    ) -> Option<PartialRecord> {
        match record {
            PartialRecord::Partial {
                start,
                slot,
                group,
                source,
                agg,
            } => {
                let spec = spec?;
                if self.frontier.is_some_and(|f| spec.is_closed(start, f)) {
                    // A replay of a partial already merged and emitted: delete it again.
                    return agg.map(|_| {
                        metrics::stale_partials(1);
                        PartialRecord::tombstone(start, slot, group, source)
                    });
                }
                let groups = self.windows.entry(start).or_default();
                let key = (slot, group.into_boxed_str());
                match agg {
                    Some(agg) => {
                        groups.entry(key).or_default().insert(source, *agg);
                        self.changed.insert(start);
                    }
                    None => {
                        if let Some(sources) = groups.get_mut(&key) {
                            sources.remove(&source);
                            if sources.is_empty() {
                                groups.remove(&key);
                            }
                        }
                        if groups.is_empty() {
                            self.windows.remove(&start);
                        }
                    }
                }
            }
            PartialRecord::Progress {
                source,
                watermark,
                idle,
                closed_through,
            } => {
                self.progress.insert(
                    source,
                    Progress {
                        watermark,
                        idle,
                        closed_through,
                    },
                );
            }
            PartialRecord::Frontier(f) => {
                self.frontier = Some(self.frontier.map_or(f, |old| old.max(f)));
                // Read back before their tombstones (or after a crash between the two): the
                // emitted windows are done.
                if let Some(spec) = spec {
                    self.windows.retain(|&start, _| !spec.is_closed(start, f));
                }
            }
            PartialRecord::Day {
                day,
                slot,
                group,
                source,
                part,
                ids,
            } => {
                let closed = |f: i64| day + DAY_MS + day_grace <= f;
                if self.day_frontier.is_some_and(closed) {
                    return ids.map(|_| {
                        metrics::stale_partials(1);
                        PartialRecord::Day {
                            day,
                            slot,
                            group,
                            source,
                            part,
                            ids: None,
                        }
                    });
                }
                let groups = self.days.entry(day).or_default();
                let key = (slot, group.into_boxed_str());
                match ids {
                    Some(ids) => {
                        let exact = ids.accounts.is_exact();
                        let entry = groups.entry(key).or_insert_with(|| DayGroup {
                            ids: Active::new(exact),
                            records: BTreeSet::new(),
                        });
                        entry.ids.merge(&ids);
                        entry.records.insert((source, part));
                        self.days_changed.insert(day);
                    }
                    None => {
                        // Ids cannot be taken out of a union: only the merge deletes day
                        // records, after the day is emitted.
                        if let Some(entry) = groups.get_mut(&key) {
                            entry.records.remove(&(source, part));
                        }
                    }
                }
            }
            PartialRecord::DayProgress {
                source,
                watermark,
                idle,
                closed_through,
            } => {
                self.day_progress.insert(
                    source,
                    Progress {
                        watermark,
                        idle,
                        closed_through,
                    },
                );
            }
            PartialRecord::DayFrontier(f) => {
                self.day_frontier = Some(self.day_frontier.map_or(f, |old| old.max(f)));
                self.days.retain(|&day, _| day + DAY_MS + day_grace > f);
                self.days_changed
                    .retain(|&day| day + DAY_MS + day_grace > f);
            }
        }
        None
    }
}

/// The watermark through which every source partition's owner has closed windows (or days),
/// once all `sources` have reported.
fn closed_everywhere(progress: &BTreeMap<i32, Progress>, sources: i32) -> Option<i64> {
    (0..sources)
        .map(|p| progress.get(&p).map(|r| r.closed_through))
        .min()
        .flatten()
}

/// The minimum watermark over source partitions that are not idle (the largest when all
/// are), once all `sources` have reported.
fn global_watermark(progress: &BTreeMap<i32, Progress>, sources: i32) -> Option<i64> {
    let all: Option<Vec<Progress>> = (0..sources).map(|p| progress.get(&p).copied()).collect();
    let all = all?;
    let active = all.iter().filter(|r| !r.idle).map(|r| r.watermark).min();
    active.or_else(|| all.iter().map(|r| r.watermark).max())
}

/// The union over partitions of every group of one day.
fn united(groups: &DayGroups) -> DayPartial {
    let mut partial = DayPartial::default();
    for ((slot, group), entry) in groups {
        let exact = entry.ids.accounts.is_exact();
        partial
            .group_mut(usize::from(*slot), group, exact)
            .merge(&entry.ids);
    }
    partial
}

/// The sum of every source partition's partial of one window.
fn merged(groups: &Groups) -> WindowPartial {
    let mut partial = WindowPartial::default();
    for ((slot, group), sources) in groups {
        let agg = partial.group_mut(*slot, group);
        for source in sources.values() {
            agg.merge(source);
        }
    }
    partial
}

/// The running merge task.
pub struct Merge {
    source: Source,
    core: Core,
}

/// Everything but the consumer, so a borrowed message can be handled while it is held.
struct Core {
    options: MergeOptions,
    sink: Sink,
    global: GlobalWatermark,
    parts: BTreeMap<i32, MergePartition>,
    on_result: Option<ResultHook>,
    gauges: metrics::LastWindowGauges,
    /// Start of the window the gauges show: an older window's results never replace them.
    gauge_window: i64,
    day_gauges: metrics::DailyActiveGauges,
    /// The day the DAU gauges show.
    gauge_day: i64,
    last_early: Instant,
    last_running: Instant,
    /// Frontiers and tombstones of what was emitted, written once the results are delivered
    /// (a frontier must never be read back without its results).
    owed: Vec<(i32, PartialRecord)>,
    health: Arc<Health>,
}

impl Merge {
    /// The merge over `source` (subscribed to the partials topic), writing results through
    /// `sink` and the global watermark to `global`.
    pub fn new(
        options: MergeOptions,
        source: Source,
        sink: Sink,
        global: GlobalWatermark,
        on_result: Option<ResultHook>,
        health: Arc<Health>,
    ) -> Self {
        let core = Core {
            options,
            sink,
            global,
            parts: BTreeMap::new(),
            on_result,
            gauges: metrics::LastWindowGauges::default(),
            gauge_window: i64::MIN,
            day_gauges: metrics::DailyActiveGauges::default(),
            gauge_day: i64::MIN,
            last_early: Instant::now(),
            last_running: Instant::now(),
            owed: Vec::new(),
            health,
        };
        Self { source, core }
    }

    /// Runs until `shutdown`, then writes what it owes.
    pub fn run(self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let Self {
            source,
            core: mut this,
        } = self;
        this.health.set_ready(MERGE_TASK, true);
        let (mut last_tick, mut last_checkpoint) = (Instant::now(), Instant::now());
        while !shutdown.is_cancelled() {
            let polled = source.poll(Duration::from_millis(20));
            if source.assignments_changed() {
                for change in source.take_assignments() {
                    this.reassign(&source, change)?;
                }
            }
            match polled {
                Some(Ok(message)) => this.handle(&message)?,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(part) = this.parts.get_mut(&p) {
                        part.rebuilt = true;
                    }
                }
                None => {}
                Some(Err(e)) => crate::io::source::retriable(e)?,
            }
            if last_tick.elapsed() >= TICK {
                this.tick()?;
                last_tick = Instant::now();
            }
            if last_checkpoint.elapsed() >= this.options.checkpoint_interval {
                this.checkpoint(&source)?;
                last_checkpoint = Instant::now();
            }
        }
        this.tick()?;
        this.checkpoint(&source)
    }
}

impl Core {
    fn reassign(&mut self, source: &Source, change: Assignment) -> Result<(), PipelineError> {
        match change {
            Assignment::Assigned(partitions) => {
                // The state of a partition is its content: it is read from the start, where
                // a partition without a committed offset begins (the merge commits none, or
                // 0 with exactly-once, where offsets only fence zombies).
                for p in &partitions {
                    self.parts.insert(*p, MergePartition::default());
                }
                self.recall_frontiers(source, &partitions)?;
                tracing::info!(
                    ?partitions,
                    "merge partitions assigned; reading them from the start"
                );
            }
            Assignment::Revoked(partitions) => {
                self.checkpoint(source)?;
                for p in &partitions {
                    self.parts.remove(p);
                }
                source.release(&partitions)?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, message: &BorrowedMessage<'_>) -> Result<(), PipelineError> {
        let p = message.partition();
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        let Some(key) = message.key() else {
            return Ok(());
        };
        let Some(record) = PartialRecord::decode(key, message.payload()) else {
            tracing::warn!(
                topic = %self.options.topic,
                partition = p,
                offset = message.offset(),
                "not a partials record; skipped (is another application writing to this internal topic?)"
            );
            return Ok(());
        };
        let spec = self.options.windows.as_ref().map(|w| &w.spec);
        let day_grace = self.options.days.as_ref().map_or(0, |d| d.grace);
        if let Some(tombstone) = part.apply(spec, day_grace, record) {
            let (key, value) = tombstone.encode();
            self.sink
                .send_raw(&self.options.topic, &key, value.as_deref(), p, None)?;
        }
        Ok(())
    }

    /// Publishes the global watermark, emits every window and day closed everywhere, and
    /// early and running results when they are due.
    fn tick(&mut self) -> Result<(), PipelineError> {
        let sources = self.options.sources;
        if let Some(g) = self
            .parts
            .values()
            .flat_map(|m| {
                let windows = global_watermark(&m.progress, sources);
                windows
                    .into_iter()
                    .chain(global_watermark(&m.day_progress, sources))
            })
            .max()
        {
            self.global.fetch_max(g, Ordering::AcqRel);
        }
        self.close_windows()?;
        self.close_days()?;
        self.early()?;
        self.running()
    }

    /// Emits every window closed everywhere.
    fn close_windows(&mut self) -> Result<(), PipelineError> {
        let Some(windows) = &self.options.windows else {
            return Ok(());
        };
        let (spec, qoe, sources) = (windows.spec, windows.qoe, self.options.sources);
        let mut emitted: Vec<(i64, Vec<crate::record::QosWindow>)> = Vec::new();
        for (&p, part) in self.parts.iter_mut().filter(|(_, m)| m.rebuilt) {
            let Some(closed) = closed_everywhere(&part.progress, sources) else {
                continue;
            };
            if part.frontier.is_some_and(|f| f >= closed) {
                continue;
            }
            let starts: Vec<i64> = part
                .windows
                .keys()
                .copied()
                .take_while(|s| spec.is_closed(*s, closed))
                .collect();
            self.owed.push((p, PartialRecord::Frontier(closed)));
            for start in starts {
                let groups = part.windows.remove(&start).expect("listed above");
                part.changed.remove(&start);
                let results = merged(&groups).results(&spec, start, true, qoe);
                tracing::debug!(partition = p, start, closed, "window emitted");
                for ((slot, group), sources) in groups {
                    for source in sources.into_keys() {
                        let group = group.to_string();
                        let tombstone = PartialRecord::tombstone(start, slot, group, source);
                        self.owed.push((p, tombstone));
                    }
                }
                emitted.push((start, results));
            }
            part.frontier = Some(closed);
        }
        self.emit(&mut emitted, true)?;
        Ok(())
    }

    /// Emits every day closed everywhere.
    fn close_days(&mut self) -> Result<(), PipelineError> {
        let Some(days) = &self.options.days else {
            return Ok(());
        };
        let (grace, sources) = (days.grace, self.options.sources);
        let mut emitted: Vec<(i64, Vec<DailyActive>)> = Vec::new();
        for (&p, part) in self.parts.iter_mut().filter(|(_, m)| m.rebuilt) {
            let Some(closed) = closed_everywhere(&part.day_progress, sources) else {
                continue;
            };
            if part.day_frontier.is_some_and(|f| f >= closed) {
                continue;
            }
            self.owed.push((p, PartialRecord::DayFrontier(closed)));
            while let Some(entry) = part.days.first_entry() {
                let day = *entry.key();
                if day + DAY_MS + grace > closed {
                    break;
                }
                let groups = entry.remove();
                part.days_changed.remove(&day);
                emitted.push((day, united(&groups).results(day, true)));
                for ((slot, group), entry) in groups {
                    for (source, part) in entry.records {
                        let tombstone = PartialRecord::Day {
                            day,
                            slot,
                            group: group.to_string(),
                            source,
                            part,
                            ids: None,
                        };
                        self.owed.push((p, tombstone));
                    }
                }
            }
            part.day_frontier = Some(closed);
        }
        let sent = self.emit_days(&mut emitted)?;
        metrics::results_emitted(sent);
        Ok(())
    }

    /// Every DAU `interval`, writes running values of the open days that changed.
    fn running(&mut self) -> Result<(), PipelineError> {
        let Some(days) = &self.options.days else {
            return Ok(());
        };
        if self.last_running.elapsed() < days.interval {
            return Ok(());
        }
        self.last_running = Instant::now();
        let mut open = Vec::new();
        for part in self.parts.values_mut().filter(|m| m.rebuilt) {
            for day in std::mem::take(&mut part.days_changed) {
                if let Some(groups) = part.days.get(&day) {
                    open.push((day, united(groups).results(day, false)));
                }
            }
        }
        let sent = self.emit_days(&mut open)?;
        metrics::early_results_emitted(sent);
        Ok(())
    }

    /// Sends days' results and points the DAU gauges at the newest day. Returns the number
    /// of results sent.
    fn emit_days(&mut self, days: &mut [(i64, Vec<DailyActive>)]) -> Result<u64, PipelineError> {
        let Some(config) = &self.options.days else {
            return Ok(0);
        };
        let (gauge_day, gauges) = (&mut self.gauge_day, &mut self.day_gauges);
        send_in_order(
            &self.sink,
            &config.output,
            days,
            DailyActive::key,
            // A day's values come in parts (per merge partition, changed groups only): a
            // newer day replaces what the gauges show, a part of the shown day updates it.
            |day, results| {
                if day > *gauge_day {
                    *gauge_day = day;
                    gauges.publish(results);
                } else if day == *gauge_day {
                    gauges.update(results);
                }
            },
        )
    }

    /// With the `early` policy, writes not-final results of the open windows that changed.
    fn early(&mut self) -> Result<(), PipelineError> {
        let Some(windows) = &self.options.windows else {
            return Ok(());
        };
        let Some(interval) = windows.early_interval else {
            return Ok(());
        };
        if self.last_early.elapsed() < interval {
            return Ok(());
        }
        self.last_early = Instant::now();
        let (spec, qoe) = (windows.spec, windows.qoe);
        let mut open = Vec::new();
        for part in self.parts.values_mut() {
            for start in std::mem::take(&mut part.changed) {
                if let Some(groups) = part.windows.get(&start) {
                    open.push((start, merged(groups).results(&spec, start, false, qoe)));
                }
            }
        }
        let n = self.emit(&mut open, false)?;
        metrics::early_results_emitted(n);
        Ok(())
    }

    /// Sends `windows`' results and points the gauges at the newest final window unless they
    /// already show a newer one. Returns the number of results sent.
    fn emit(
        &mut self,
        windows: &mut [(i64, Vec<crate::record::QosWindow>)],
        is_final: bool,
    ) -> Result<u64, PipelineError> {
        let Some(config) = &self.options.windows else {
            return Ok(0);
        };
        let mut hook = self.on_result.as_mut().filter(|_| is_final);
        let sent = send_in_order(
            &self.sink,
            &config.results,
            windows,
            crate::record::QosWindow::key,
            |_, results| {
                if let Some(hook) = hook.as_mut() {
                    results.iter().for_each(hook);
                }
            },
        )?;
        if is_final && !windows.is_empty() {
            metrics::windows_closed(windows.len() as u64);
            metrics::results_emitted(sent);
            let newest = windows.iter().map(|(s, _)| *s).max().expect("not empty");
            if newest >= self.gauge_window {
                self.gauge_window = newest;
                let slots = &config.gauge_slots;
                let shown: Vec<_> = windows
                    .iter()
                    .filter(|(s, _)| *s == newest)
                    .flat_map(|(_, r)| r)
                    .filter(|r| {
                        r.dimension == "all" || slots.iter().any(|&s| slot_name(s) == r.dimension)
                    })
                    .cloned()
                    .collect();
                self.gauges.publish(&shown);
            }
        }
        Ok(sent)
    }

    /// Exactly-once: takes up the frontiers the group's last committed transaction recorded
    /// for `partitions`. Their frontier records may still be out of reach when the partition
    /// is read to its end: a `read_committed` reader stops at the first open transaction of
    /// any writer (phase one writes there all the time), and windows closed by the earlier
    /// owner would otherwise be emitted a second time.
    fn recall_frontiers(
        &mut self,
        source: &Source,
        partitions: &[i32],
    ) -> Result<(), PipelineError> {
        if !self.sink.is_transactional() {
            return Ok(());
        }
        for (p, metadata) in source.committed_metadata(partitions)? {
            if let (Some(part), Some(frontiers)) =
                (self.parts.get_mut(&p), Frontiers::decode(&metadata))
            {
                part.frontier = frontiers.windows;
                part.day_frontier = frontiers.days;
            }
        }
        Ok(())
    }

    /// Sends the frontiers and tombstones owed (after the results they follow).
    fn send_owed(&mut self) -> Result<(), PipelineError> {
        for (p, record) in std::mem::take(&mut self.owed) {
            let (key, value) = record.encode();
            self.sink
                .send_raw(&self.options.topic, &key, value.as_deref(), p, None)?;
        }
        Ok(())
    }

    /// Delivers what was sent (at least once), or commits it as one transaction.
    fn checkpoint(&mut self, source: &Source) -> Result<(), PipelineError> {
        if !self.sink.is_transactional() {
            // The results first: a frontier delivered without them would lose them.
            self.sink.flush()?;
            if self.owed.is_empty() {
                return Ok(());
            }
            self.send_owed()?;
            return self.sink.flush();
        }
        self.send_owed()?;
        let records = self.sink.take_outbox();
        if records.is_empty() {
            return Ok(());
        }
        let group = source.group_metadata().ok_or_else(|| {
            PipelineError::Other(
                "the merge consumer has no group metadata for a transaction".into(),
            )
        })?;
        // The offsets fence a zombie owner through the group's generation; the merge always
        // reads its partitions from the start, so they stay at 0. Their metadata carries the
        // frontiers this transaction commits (see `recall_frontiers`).
        let offsets: Vec<(i32, i64, String)> = self
            .parts
            .iter()
            .map(|(&p, part)| (p, 0, Frontiers::of(part).encode()))
            .collect();
        match self.sink.publish(
            &records,
            None,
            &source.offset_list_with_metadata(&offsets),
            &group,
        ) {
            Err(e) if e.is_retriable_transaction() => {
                // Aborted (a rebalance changed the generation): the state is what the topic
                // holds, so the partitions are read again and the windows closed again.
                tracing::warn!(error = %e, "a merge transaction was aborted; reading the partitions again");
                for (&p, part) in self.parts.iter_mut() {
                    *part = MergePartition::default();
                    source.seek(p, rdkafka::Offset::Offset(0))?;
                }
                let partitions: Vec<i32> = self.parts.keys().copied().collect();
                self.recall_frontiers(source, &partitions)
            }
            other => other,
        }
    }
}

/// Sends `batches` of results (each a window or day and its results) oldest first; `sent`
/// sees each batch once it is sent. Returns the number of results sent.
fn send_in_order<R: serde::Serialize>(
    sink: &Sink,
    output: &Output,
    batches: &mut [(i64, Vec<R>)],
    key: impl Fn(&R) -> String,
    mut sent: impl FnMut(i64, &[R]),
) -> Result<u64, PipelineError> {
    batches.sort_by_key(|(at, _)| *at);
    let mut count = 0;
    for (at, results) in batches.iter() {
        for r in results {
            sink.send_result(output, &key(r), r, None, &[])?;
        }
        count += results.len() as u64;
        sent(*at, results);
    }
    Ok(count)
}

/// A merge partition's frontiers, as the metadata of its committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frontiers {
    windows: Option<i64>,
    days: Option<i64>,
}

impl Frontiers {
    const PREFIX: &'static str = "marquee-merge/1";

    fn of(part: &MergePartition) -> Self {
        Self {
            windows: part.frontier,
            days: part.day_frontier,
        }
    }

    fn encode(self) -> String {
        let show = |f: Option<i64>| f.map_or_else(|| "-".to_string(), |f| f.to_string());
        format!(
            "{} {} {}",
            Self::PREFIX,
            show(self.windows),
            show(self.days)
        )
    }

    /// `None` for metadata that is not Marquee's (or of another version).
    fn decode(metadata: &str) -> Option<Self> {
        let mut fields = metadata.split(' ');
        if fields.next()? != Self::PREFIX {
            return None;
        }
        let mut next = || match fields.next()? {
            "-" => Some(None),
            f => f.parse().ok().map(Some),
        };
        let (windows, days) = (next()?, next()?);
        Some(Self { windows, days })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontiers_round_trip_through_offset_metadata() {
        for frontiers in [
            Frontiers {
                windows: None,
                days: None,
            },
            Frontiers {
                windows: Some(-5),
                days: Some(1_767_225_600_000),
            },
        ] {
            assert_eq!(Frontiers::decode(&frontiers.encode()), Some(frontiers));
        }
        for foreign in [
            "",
            "0",
            "marquee-merge/1 1",
            "marquee-merge/0 1 2",
            "marquee-merge/1 x -",
        ] {
            assert_eq!(Frontiers::decode(foreign), None, "{foreign:?}");
        }
    }
}
