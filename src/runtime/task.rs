//! One task: a consumer of one topic driving a set of operators.
//!
//! A single thread polls the consumer and runs every stage on each record, so no stage waits
//! on another and nothing is queued between them. Every `TICK_RECORDS` records (and on quiet
//! polls) the operator watermark is recomputed, operators see it and the wall clock, and
//! partitions running ahead are paused. Every `checkpoint_interval`:
//!
//! 0. operators send what they owe (rate-limited outputs);
//! 1. flush the producer: every result, late and dead-letter record sent so far is delivered;
//! 2. write one RocksDB batch: every operator's changed state, and each partition's next
//!    offset and largest event time;
//! 3. commit offsets to Kafka (for lag monitoring and new machines only).
//!
//! A crash between 1 and 2 replays from the previous checkpoint and re-emits identical keyed
//! records; a crash before 1 loses nothing, since no offset moved.
//!
//! With exactly-once ([`Transactions`]) the producer holds the outputs instead: step 2 also
//! stores them (an outbox), then one Kafka transaction sends them with a checkpoint marker
//! and the input offsets, and the outbox is cleared. A crash between the two is settled when
//! the group is first joined again: an outbox whose marker committed is done; otherwise it is
//! dropped and the partitions whose local state is ahead of the committed offsets are
//! restored from the changelogs (see `Core::stale`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use super::standby::Standby;
use super::{Context, Handled, Operator, PartitionMark, Record};
use crate::check::check;
use crate::error::PipelineError;
use crate::io::changelog::Changelog;
use crate::io::decode::Decoder;
use crate::io::sink::{Pending, Sink};
use crate::io::source::{Assignment, Landing, Reposition, Source};
use crate::metrics::{self, PartitionCounters};
use crate::record::{Origin, PlaybackEvent};
use crate::serve::http::Health;
use crate::state::{Batch, PartitionMeta, Store};
use crate::watermark::Watermarks;

/// Records between watermark ticks while data flows.
const TICK_RECORDS: u32 = 4096;
/// Records between two reads of the clock (a divisor of `TICK_RECORDS`).
const CLOCK_RECORDS: u32 = 64;
/// Longest time between watermark ticks.
const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest a restore waits for the changelogs to reach the committed offsets.
const RESTORE_SETTLE: Duration = Duration::from_secs(90);
/// A gap between ticks longer than this is a stall of Marquee itself, not quiet of the data.
const STALL_GAP: Duration = Duration::from_secs(1);
/// How long a repositioned partition may deliver nothing while the broker holds records past
/// its position before it is sought back (see [`Reposition`]).
const REPOSITION_PATIENCE: Duration = Duration::from_secs(2);

/// How a task reads time and checkpoints.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Name of the task's offsets and watermarks in the meta column family, and of its
    /// readiness in `/readyz`.
    pub name: &'static str,
    /// An earlier name of the same offsets, read when the task has none under `name`.
    pub legacy_name: Option<&'static str>,
    /// The watermark's bound on disorder.
    pub out_of_orderness: Duration,
    /// How long a caught-up partition stays quiet before it is idle.
    pub idle_timeout: Duration,
    /// The clock-skew guard (`time.max_future_skew`), in milliseconds.
    pub max_future_skew_ms: i64,
    /// Pause partitions this far (ms) ahead of the slowest; `None` never pauses.
    pub max_drift_ms: Option<i64>,
    /// Where records late for any operator go, unchanged.
    pub late_topic: Option<String>,
    /// Exactly-once: the compacted topic whose last committed record per task says which
    /// checkpoint's transaction committed, and the brokers to read it from. The sink must be
    /// transactional.
    pub transactions: Option<Transactions>,
    /// The changelog topics of the task's stores, when its state can move to another
    /// instance.
    pub changelog: Option<Changelog>,
    pub checkpoint_interval: Duration,
    /// Standby copies of each partition's state kept on other instances (with a changelog).
    pub standby_replicas: usize,
}

/// Where a transactional task records its committed checkpoints.
#[derive(Debug, Clone)]
pub struct Transactions {
    pub marker_topic: String,
    /// This task's key in the marker topic: its transactional id, one per task and instance
    /// (another instance's markers say nothing of this one's checkpoints).
    pub marker_key: String,
    pub brokers: String,
}

/// State of one owned input partition.
struct PartitionState {
    /// Next offset to process; records below it are already in the state.
    next_offset: Option<i64>,
    /// Paused by watermark alignment.
    paused: bool,
    /// Set when the fetch position moved (assignment, resume): where the partition must
    /// continue, checked on its first record.
    reposition: Option<Reposition>,
    /// The checkpoint last written: an unchanged one is not written again (nor its
    /// changelog record sent).
    checkpointed: Option<PartitionMeta>,
    counters: PartitionCounters,
}

/// A running task.
pub struct Task {
    source: Source,
    core: Core,
}

/// Everything but the consumer, so a borrowed message can be handled while it is held.
struct Core {
    options: TaskOptions,
    decoder: Decoder,
    /// The record being handled, decoded into the same buffers every time.
    scratch: PlaybackEvent,
    sink: Sink,
    store: Arc<Store>,
    operators: Vec<Box<dyn Operator>>,
    marks: Watermarks,
    /// The owned partitions' watermarks and idleness as of the last tick.
    partition_marks: Vec<PartitionMark>,
    parts: BTreeMap<i32, PartitionState>,
    topic: String,
    /// Wall clock of the current tick, for idleness.
    now: Instant,
    /// Records processed since the last tick.
    processed: u64,
    /// Seeks owed to partitions whose broker skipped past the position they need.
    seeks: Vec<(i32, i64)>,
    health: Arc<Health>,
    /// Exactly-once: the number of the last checkpoint, and whether the outbox left by an
    /// earlier run has been settled.
    checkpoint_number: u64,
    recovered: bool,
    /// A transaction was aborted: the owned partitions are taken up again after the next poll.
    start_over: bool,
    /// Warm copies of partitions other instances own.
    standby: Option<Standby>,
}

impl Task {
    /// Wires `operators` to `source`; nothing is consumed until [`Task::run`].
    pub fn new(
        options: TaskOptions,
        source: Source,
        decoder: Decoder,
        sink: Sink,
        store: Arc<Store>,
        operators: Vec<Box<dyn Operator>>,
        health: Arc<Health>,
    ) -> Self {
        let standby = match &options.changelog {
            Some(changelog) if options.standby_replicas > 0 => Some(Standby::new(
                options.name,
                options.standby_replicas,
                changelog.clone(),
            )),
            _ => None,
        };
        let core = Core {
            standby,
            marks: Watermarks::new(options.out_of_orderness, options.idle_timeout),
            partition_marks: Vec::new(),
            topic: source.topic().to_string(),
            options,
            decoder,
            scratch: PlaybackEvent::default(),
            sink,
            store,
            operators,
            parts: BTreeMap::new(),
            now: Instant::now(),
            processed: 0,
            seeks: Vec::new(),
            health,
            checkpoint_number: 0,
            recovered: false,
            start_over: false,
        };
        Self { source, core }
    }

    /// Runs until `shutdown`, then checkpoints everything owed and returns.
    pub fn run(self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let Self { source, mut core } = self;
        let mut since_tick = 0u32;
        let mut last_tick = Instant::now();
        let mut last_checkpoint = Instant::now();
        while !shutdown.is_cancelled() {
            let polled = source.poll(Duration::from_millis(50));
            if source.assignments_changed() {
                for change in source.take_assignments() {
                    core.reassign(&source, change)?;
                }
            }
            if std::mem::take(&mut core.start_over) {
                core.reassign(&source, Assignment::Assigned(source.assignment()?))?;
                core.rewind(&source)?;
            }
            match polled {
                Some(Ok(message)) => {
                    core.handle(&message)?;
                    since_tick += 1;
                }
                Some(Err(KafkaError::PartitionEOF(p))) => core.marks.set_caught_up(p, true),
                Some(Err(e)) => crate::io::source::retriable(e)?,
                None => since_tick = TICK_RECORDS,
            }
            core.apply_seeks(&source)?;
            // The clock is read every CLOCK_RECORDS records (a read per record costs as much
            // as a tenth of the pipeline), and always after a quiet poll.
            if since_tick % CLOCK_RECORDS != 0 {
                continue;
            }
            let now = Instant::now();
            if since_tick >= TICK_RECORDS || now.duration_since(last_tick) >= TICK_INTERVAL {
                core.tick(&source)?;
                core.keep_standby(&source)?;
                since_tick = 0;
                last_tick = Instant::now();
            }
            if now.duration_since(last_checkpoint) >= core.options.checkpoint_interval {
                core.checkpoint(&source, false)?;
                last_checkpoint = Instant::now();
            }
        }
        core.tick(&source)?;
        core.checkpoint(&source, true)?;
        tracing::info!(
            task = core.options.name,
            "stopped cleanly: outputs flushed, state and offsets checkpointed"
        );
        Ok(())
    }
}

impl Core {
    /// Restores newly assigned partitions; checkpoints, then drops, revoked ones.
    fn reassign(&mut self, source: &Source, change: Assignment) -> Result<(), PipelineError> {
        match change {
            Assignment::Assigned(partitions) => {
                if let Some(standby) = &mut self.standby {
                    standby.promote(&partitions)?;
                    standby.invalidate();
                }
                // The group is joined: what a crash left unsent can now be settled.
                let mut stale = self.stale(source, &partitions)?;
                if !self.recovered {
                    // Only what is still current may be sent again: a partition that another
                    // instance processed since is restored from the changelogs instead.
                    let current: Vec<i32> = partitions
                        .iter()
                        .copied()
                        .filter(|p| !stale.contains(p))
                        .collect();
                    if self.settle_outbox(source, &current)? {
                        stale = partitions.clone();
                    }
                    self.recovered = true;
                }
                self.restore(&stale)?;
                self.restore_until_committed(source, &stale)?;
                for p in partitions {
                    self.assign(p)?;
                }
                tracing::info!(task = self.options.name, owned = ?self.parts.keys().collect::<Vec<_>>(), "partitions assigned");
                // Ready once the assigned partitions' state is restored.
                self.health.set_ready(self.options.name, true);
            }
            Assignment::Revoked(partitions) => {
                self.checkpoint(source, true)?;
                for &p in &partitions {
                    self.parts.remove(&p);
                    self.marks.disown(p);
                    for op in &mut self.operators {
                        op.revoke(p);
                    }
                }
                source.release(&partitions)?;
                if let Some(standby) = &mut self.standby {
                    standby.invalidate();
                }
                tracing::info!(task = self.options.name, owned = ?self.parts.keys().collect::<Vec<_>>(), "partitions revoked");
            }
        }
        Ok(())
    }

    /// The checkpoint of `p`, under the task's name or its earlier one.
    fn partition_meta(&self, p: i32) -> Result<Option<PartitionMeta>, PipelineError> {
        let meta = self.store.partition_meta(self.options.name, p)?;
        Ok(match (meta, self.options.legacy_name) {
            (None, Some(legacy)) => self.store.partition_meta(legacy, p)?,
            (meta, _) => meta,
        })
    }

    /// Of the newly assigned `partitions`, those whose local state is missing or behind the
    /// group's committed offset (another instance processed them), or a standby copy: with
    /// changelogs, they are restored (a copy caught up) before they are processed.
    fn stale(&self, source: &Source, partitions: &[i32]) -> Result<Vec<i32>, PipelineError> {
        if self.options.changelog.is_none() {
            return Ok(Vec::new());
        }
        let new: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !self.parts.contains_key(p))
            .collect();
        let committed = source.committed(&new)?;
        let mut stale = Vec::new();
        let exactly_once = self.options.transactions.is_some();
        for p in new {
            // A copy becomes this instance's own state only through the restore.
            if self.store.standby_offsets(self.options.name, p)?.is_some() {
                stale.push(p);
                continue;
            }
            let local = self.partition_meta(p)?.map(|m| m.next_offset);
            let stale_here = match (local, committed.get(&p).copied()) {
                // Exactly-once: local state is a cache of what the transactions committed,
                // trusted only where it is exactly that. Ahead, it holds a checkpoint whose
                // transaction never committed (its outputs, partials included, are lost).
                (local, committed) if exactly_once => local != committed,
                // At least once the group's offsets lag the state: local state that reached
                // them is current. Without a committed offset the partition starts from its
                // beginning, where empty state is right.
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(local), Some(c)) => c > local,
            };
            if stale_here {
                stale.push(p);
            }
        }
        Ok(stale)
    }

    /// Exactly-once: a restored partition must reach the group's committed offset, as its
    /// positions are committed in the same transaction. It falls short when an open
    /// transaction of a crashed writer holds the changelog's readers back (`read_committed`
    /// stops there) while a later owner committed after it: those partitions are restored
    /// again once that transaction is aborted (by the crashed instance's restart or its
    /// `transaction.timeout.ms`), for at most [`RESTORE_SETTLE`].
    fn restore_until_committed(
        &mut self,
        source: &Source,
        restored: &[i32],
    ) -> Result<(), PipelineError> {
        if self.options.transactions.is_none() || restored.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + RESTORE_SETTLE;
        loop {
            let committed = source.committed(restored)?;
            let mut behind = Vec::new();
            for (&p, &offset) in &committed {
                let local = self.partition_meta(p)?.map(|m| m.next_offset);
                if local != Some(offset) {
                    behind.push(p);
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    task = self.options.name,
                    partitions = ?behind,
                    "the changelogs still end before the committed offsets; going on from \
                     what they hold (outputs since then may be written again)"
                );
                return Ok(());
            }
            tracing::info!(task = self.options.name, partitions = ?behind, "the changelogs end before the committed offsets (an open transaction holds them back); restoring again");
            std::thread::sleep(Duration::from_secs(1));
            self.restore(&behind)?;
        }
    }

    /// Follows standby placement and applies what arrived for the copies.
    fn keep_standby(&mut self, source: &Source) -> Result<(), PipelineError> {
        let Some(standby) = &mut self.standby else {
            return Ok(());
        };
        let owned: BTreeSet<i32> = self.parts.keys().copied().collect();
        standby.refresh(source, &self.store, &owned)?;
        standby.apply(&self.store)
    }

    /// Rebuilds `stale` partitions from the changelog topics.
    fn restore(&mut self, stale: &[i32]) -> Result<(), PipelineError> {
        let Some(changelog) = &self.options.changelog else {
            return Ok(());
        };
        if stale.is_empty() {
            return Ok(());
        }
        let name = self.options.name;
        self.health.set_ready(name, false);
        let health = &self.health;
        changelog.restore(&self.store, name, stale, |line| {
            health.set_progress(name, Some(line.to_string()))
        })?;
        self.health.set_progress(name, None);
        Ok(())
    }

    fn assign(&mut self, p: i32) -> Result<(), PipelineError> {
        if self.parts.contains_key(&p) {
            return Ok(());
        }
        let meta = self.partition_meta(p)?;
        for op in &mut self.operators {
            op.assign(p, meta.as_ref())?;
        }
        tracing::info!(
            task = self.options.name,
            partition = p,
            next_offset = ?meta.map(|m| m.next_offset),
            "partition assigned, state restored"
        );
        self.marks
            .assign(p, meta.and_then(|m| m.max_event_time), self.now);
        self.parts.insert(
            p,
            PartitionState {
                next_offset: meta.map(|m| m.next_offset),
                paused: false,
                reposition: meta.map(|m| Reposition::new(m.next_offset, self.now)),
                checkpointed: meta,
                counters: PartitionCounters::new(&self.topic, p),
            },
        );
        Ok(())
    }

    fn handle(&mut self, message: &BorrowedMessage<'_>) -> Result<(), PipelineError> {
        let p = message.partition();
        let Some(part) = self.parts.get_mut(&p) else {
            tracing::warn!(
                partition = p,
                "record from a partition this instance does not own"
            );
            return Ok(());
        };
        let offset = message.offset();
        if let Some(reposition) = part.reposition.as_mut() {
            match reposition.landed(offset, self.now) {
                Landing::Continuous => part.reposition = None,
                Landing::SeekBack(to) => {
                    // Not handled: the seek serves this record again after the skipped ones.
                    self.seeks.push((p, to));
                    return Ok(());
                }
                Landing::Missing => {
                    missing(p, reposition.target, offset);
                    part.reposition = None;
                }
            }
        }
        if part.next_offset.is_some_and(|next| offset < next) {
            return Ok(()); // already reflected in the checkpointed state
        }
        part.next_offset = Some(offset + 1);
        part.counters.consumed();
        self.processed += 1;
        self.marks.touch(p, self.now);
        let origin = Origin {
            partition: p,
            offset,
            timestamp: message.timestamp().to_millis(),
        };
        let (key, value) = (message.key(), message.payload());
        let event = &mut self.scratch;
        let checked = self
            .decoder
            .decode_into(key, value, event)?
            .and_then(|()| check(event, origin.timestamp, self.options.max_future_skew_ms));
        if let Err(e) = checked {
            part.counters.dead_lettered(e.reason());
            return self.sink.send_dead_letter(key, value, origin, &e);
        }
        let event = &self.scratch;
        part.counters.decoded();
        let record = Record {
            event,
            origin,
            key,
            value,
            watermark: self.marks.partition(p),
        };
        let ctx = Context {
            sink: &self.sink,
            now: self.now,
            partitions: &self.partition_marks,
        };
        let mut late = None;
        for op in &mut self.operators {
            if let Handled::Late {
                window_start,
                watermark,
            } = op.on_record(&ctx, &record)?
            {
                late.get_or_insert((window_start, watermark));
            }
        }
        if let Some((window_start, watermark)) = late {
            part.counters.late();
            let topic = self.options.late_topic.as_deref().ok_or_else(|| {
                PipelineError::Other(format!(
                    "task {} has no late topic, but an operator found a record late",
                    self.options.name
                ))
            })?;
            self.sink
                .send_late(topic, key, value, origin, window_start, watermark)?;
        }
        self.marks.observe(p, event.event_time);
        Ok(())
    }

    /// Seeks the partitions whose broker skipped past their position further back.
    fn apply_seeks(&mut self, source: &Source) -> Result<(), PipelineError> {
        for (p, offset) in self.seeks.drain(..) {
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            tracing::debug!(
                partition = p,
                offset,
                next = ?part.next_offset,
                "the broker continued past this partition's position; seeking back"
            );
            part.counters.sought_back();
            source.seek(p, Offset::Offset(offset))?;
        }
        Ok(())
    }

    /// Recomputes watermarks, hands operators the watermark and the clock, pauses or resumes
    /// partitions for alignment.
    fn tick(&mut self, source: &Source) -> Result<(), PipelineError> {
        let now = Instant::now();
        if now.saturating_duration_since(self.now) > STALL_GAP {
            self.marks.stalled(now);
            tracing::info!(
                task = self.options.name,
                stalled = ?now.saturating_duration_since(self.now),
                "Marquee did not look at its partitions for a while; idle clocks start again"
            );
        }
        self.now = now;
        self.health
            .add_processed(std::mem::take(&mut self.processed));
        self.partition_marks.clear();
        for &p in self.parts.keys() {
            self.partition_marks.push(PartitionMark {
                partition: p,
                watermark: self.marks.partition(p),
                idle: self.marks.is_idle(p, now),
            });
        }
        let ctx = Context {
            sink: &self.sink,
            now,
            partitions: &self.partition_marks,
        };
        if let Some(watermark) = self.marks.operator(now) {
            for op in &mut self.operators {
                op.on_watermark(&ctx, watermark)?;
            }
        }
        for op in &mut self.operators {
            op.on_tick(&ctx)?;
        }
        let now_ms = super::wall_clock_ms();
        let floor = self.marks.alignment_floor();
        for (&p, part) in self.parts.iter_mut() {
            let own = self.marks.partition(p);
            if let Some(max_drift) = self.options.max_drift_ms {
                // A partition far ahead of the slowest one only grows open-window state: let
                // the others catch up first. Catching up never changes results, only memory. A
                // paused partition resumes once the others are within half the drift, so that
                // each pause (a fetch round trip on resume) lets the slow partitions catch up a
                // good way.
                let limit = if part.paused {
                    max_drift / 2
                } else {
                    max_drift
                };
                let ahead =
                    floor.is_some_and(|floor| own != i64::MIN && own.saturating_sub(floor) > limit);
                if ahead != part.paused {
                    source.set_paused(p, ahead)?;
                    self.marks.set_paused(p, ahead, now);
                    part.paused = ahead;
                    if ahead {
                        part.counters.paused_by_alignment();
                    } else if let Some(next) = part.next_offset {
                        // librdkafka resumes at the record after the last one handed out, but
                        // not every broker serves a fetch from there: check where it lands.
                        part.reposition
                            .get_or_insert_with(|| Reposition::new(next, now));
                    }
                    tracing::debug!(partition = p, paused = ahead, "watermark alignment");
                }
            }
            // Only a repositioned partition that delivers nothing needs the broker's end.
            if let Some(r) = part.reposition.as_mut().filter(|_| !part.paused) {
                let high = source.cached_high_watermark(p);
                match r.silent(high, REPOSITION_PATIENCE, now) {
                    Some(Landing::SeekBack(to)) => self.seeks.push((p, to)),
                    Some(Landing::Missing) => {
                        missing(p, r.target, high.unwrap_or(r.target));
                        part.reposition = None;
                    }
                    _ => {}
                }
            }
            let idle = self.marks.is_idle(p, now);
            let lag = source
                .cached_high_watermark(p)
                .zip(part.next_offset)
                .map(|(high, next)| high - next);
            part.counters.publish(own, now_ms, part.paused, idle, lag);
        }
        self.apply_seeks(source)
    }

    /// Sends what operators owe, flushes outputs, writes state with offsets, then commits
    /// the offsets operators allow to Kafka. `all` on shutdown and revocation.
    fn checkpoint(&mut self, source: &Source, all: bool) -> Result<(), PipelineError> {
        if !self.recovered {
            // Nothing was processed before the first assignment, and a checkpoint now would
            // replace what a crash left unsent before it is settled.
            return Ok(());
        }
        let started = Instant::now();
        let ctx = Context {
            sink: &self.sink,
            now: started,
            partitions: &self.partition_marks,
        };
        for op in &mut self.operators {
            op.before_flush(&ctx, all)?;
        }
        self.sink.flush()?;
        let flushed = Instant::now();
        let mut batch = Batch::default();
        for op in &mut self.operators {
            op.stage(&mut batch)?;
        }
        let mut offsets = Vec::with_capacity(self.parts.len());
        for (&p, part) in &mut self.parts {
            if let Some(next_offset) = part.next_offset {
                let meta = PartitionMeta {
                    next_offset,
                    max_event_time: self.marks.max_event_time(p),
                };
                if part.checkpointed != Some(meta) {
                    self.store
                        .stage_meta(&mut batch, self.options.name, p, meta);
                    part.checkpointed = Some(meta);
                }
                offsets.push((p, next_offset));
            }
        }
        let changes = batch.take_changes();
        if self.options.changelog.is_some() {
            self.store
                .stage_changelog_pending(&mut batch, self.options.name, &changes);
        }
        if self.options.transactions.is_some() {
            // Exactly-once: the outputs are stored with the state, then sent in one
            // transaction with the offsets; a crash in between is settled on restart.
            let records = self.sink.take_outbox();
            let encoded: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut bytes = Vec::new();
                    r.encode(&mut bytes);
                    bytes
                })
                .collect();
            self.checkpoint_number += 1;
            let name = self.options.name;
            self.store
                .stage_outbox(&mut batch, name, self.checkpoint_number, &encoded);
            self.store.commit(batch)?;
            let mut records = records;
            records.extend(self.changelog_records(&changes)?);
            match self.publish(source, &records, &offsets, self.checkpoint_number) {
                Err(e) if e.is_retriable_transaction() => {
                    tracing::warn!(error = %e, "a transaction was aborted (a rebalance?); taking the partitions up again");
                    self.start_over();
                    return Ok(());
                }
                other => other?,
            }
            let mut clear = Batch::default();
            self.store.stage_outbox_clear(&mut clear, name);
            self.store.stage_changelog_pending(&mut clear, name, &[]);
            self.store.commit(clear)?;
            metrics::checkpoint(flushed - started, flushed.elapsed());
            metrics::state_size(self.store.size_bytes());
            return Ok(());
        }
        self.store.commit(batch)?;
        // The changelog gets the committed values; a crash before they are delivered sends
        // them again on restart (see `settle_outbox`).
        self.send_changelog(&changes)?;
        metrics::checkpoint(flushed - started, flushed.elapsed());
        metrics::state_size(self.store.size_bytes());
        let mut committable = Some(offsets);
        for op in &mut self.operators {
            committable = committable.and_then(|o| op.committable(o, started, all));
        }
        if let Some(offsets) = committable {
            source.commit(offsets);
        }
        Ok(())
    }
}

impl Core {
    /// The changelog records of `changes` (none without a changelog).
    fn changelog_records(
        &self,
        changes: &[crate::state::Change],
    ) -> Result<Vec<Pending>, PipelineError> {
        match &self.options.changelog {
            Some(changelog) if !changes.is_empty() => changelog.records(&self.store, changes),
            _ => Ok(Vec::new()),
        }
    }

    /// At least once: delivers the changelog records of `changes`, the positions last. A
    /// crash in between then leaves a changelog whose positions are behind its stores, never
    /// ahead: a restore replays records onto newer values (which idempotent stores, the
    /// resume table and DAU, absorb) instead of skipping records no store holds.
    fn send_changelog(&self, changes: &[crate::state::Change]) -> Result<(), PipelineError> {
        let (positions, stores): (Vec<_>, Vec<_>) = changes
            .iter()
            .cloned()
            .partition(|c| c.store == crate::state::POSITIONS);
        for part in [stores, positions] {
            let records = self.changelog_records(&part)?;
            if !records.is_empty() {
                for record in &records {
                    self.sink.send_pending(record)?;
                }
                self.sink.flush()?;
            }
        }
        Ok(())
    }

    /// Sends checkpoint `number`'s `records`, its marker and `offsets` in one transaction.
    fn publish(
        &self,
        source: &Source,
        records: &[Pending],
        offsets: &[(i32, i64)],
        number: u64,
    ) -> Result<(), PipelineError> {
        let tx = self
            .options
            .transactions
            .as_ref()
            .expect("a transactional task");
        let marker = Pending {
            topic: tx.marker_topic.clone(),
            partition: Some(0),
            key: Some(tx.marker_key.as_bytes().to_vec()),
            value: Some(number.to_be_bytes().to_vec()),
            timestamp: None,
            headers: Vec::new(),
        };
        let group = source.group_metadata().ok_or_else(|| {
            PipelineError::Other("the consumer has no group metadata for a transaction".into())
        })?;
        self.sink
            .publish(records, Some(&marker), &source.offset_list(offsets), &group)
    }

    /// After a transaction aborted by a rebalance: the owned partitions are dropped from
    /// memory and taken up again, as after a restart, once the group has settled (the
    /// uncommitted outbox is dropped and the partitions it moved ahead are restored).
    fn start_over(&mut self) {
        for p in std::mem::take(&mut self.parts).into_keys() {
            self.marks.disown(p);
            for op in &mut self.operators {
                op.revoke(p);
            }
        }
        self.recovered = false;
        self.start_over = true;
    }

    /// After a start over: the consumer went on past the partitions' restored positions
    /// while the aborted transaction was open, so each is read again from its position, or,
    /// without one, from the group's committed offset or the beginning (as a new process
    /// would). Otherwise the records of the aborted transaction would never be processed.
    fn rewind(&mut self, source: &Source) -> Result<(), PipelineError> {
        let unknown: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, part)| part.next_offset.is_none())
            .map(|(&p, _)| p)
            .collect();
        let committed = source.committed(&unknown)?;
        for (&p, part) in &self.parts {
            let to = part
                .next_offset
                .or_else(|| committed.get(&p).copied())
                .map_or(Offset::Beginning, Offset::Offset);
            tracing::info!(
                task = self.options.name,
                partition = p,
                ?to,
                "reading the partition again after the aborted transaction"
            );
            source.seek(p, to)?;
        }
        Ok(())
    }

    /// Once per run, what the last checkpoint before a crash may have left unsent: its
    /// changelog records (at least once: sent again for the `assigned` partitions, whose
    /// values have not changed since), or, exactly-once, its outputs and changelog records
    /// unless the marker topic shows that its transaction committed.
    ///
    /// Returns whether an uncommitted outbox was dropped instead: some of its partitions are
    /// no longer (or no longer only) this instance's, so whoever owns them processes them
    /// again from the committed offsets, and the local state, ahead of those, must be restored.
    fn settle_outbox(&mut self, source: &Source, assigned: &[i32]) -> Result<bool, PipelineError> {
        let name = self.options.name;
        let mut changes = match &self.options.changelog {
            Some(_) => self.store.load_changelog_pending(name)?,
            None => Vec::new(),
        };
        changes.retain(|c| assigned.contains(&c.partition));
        let Some(tx) = self.options.transactions.clone() else {
            self.send_changelog(&changes)?;
            return Ok(false);
        };
        let (number, stored) = self.store.load_outbox(name)?;
        self.checkpoint_number = number;
        if stored.is_empty() && changes.is_empty() {
            return Ok(false);
        }
        let committed = last_marker(&tx)?;
        let mut previous = Vec::new();
        for p in 0..source.partition_count()? {
            // A standby copy is not what this instance processed.
            if self.store.standby_offsets(name, p)?.is_some() {
                continue;
            }
            if let Some(meta) = self.partition_meta(p)? {
                previous.push((p, meta.next_offset));
            }
        }
        let kept = previous.iter().all(|(p, _)| assigned.contains(p));
        let dropped = committed < Some(number) && !kept;
        if dropped {
            tracing::warn!(
                task = name,
                checkpoint = number,
                "the outputs of a checkpoint whose transaction did not commit are dropped: its \
                 partitions moved, so they are processed again from the committed offsets"
            );
        } else if committed < Some(number) {
            let mut records = stored
                .iter()
                .map(|b| Pending::decode(b))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    PipelineError::Other(format!(
                        "task {name}: an undecodable record in the outbox"
                    ))
                })?;
            records.extend(self.changelog_records(&changes)?);
            let offsets = previous;
            tracing::info!(
                task = name,
                checkpoint = number,
                records = records.len(),
                "sending the outputs of a checkpoint whose transaction did not commit"
            );
            self.publish(source, &records, &offsets, number)?;
        }
        let mut clear = Batch::default();
        self.store.stage_outbox_clear(&mut clear, name);
        self.store.stage_changelog_pending(&mut clear, name, &[]);
        self.store.commit(clear)?;
        Ok(dropped)
    }
}

/// The number of the task's last committed checkpoint in the marker topic, if any.
fn last_marker(tx: &Transactions) -> Result<Option<u64>, PipelineError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &tx.brokers)
        // librdkafka assigns only within a group; this one never commits anything.
        .set("group.id", format!("{}-reader", tx.marker_topic))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(PipelineError::kafka("creating the marker reader"))?;
    let timeout = Duration::from_secs(30);
    let (_, high) = consumer
        .fetch_watermarks(&tx.marker_topic, 0, timeout)
        .map_err(PipelineError::kafka(format!(
            "reading the end of {}",
            tx.marker_topic
        )))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&tx.marker_topic, 0, rdkafka::Offset::Beginning)
        .map_err(PipelineError::kafka("assigning the marker topic"))?;
    consumer
        .assign(&tpl)
        .map_err(PipelineError::kafka("assigning the marker topic"))?;
    let mut last = None;
    let deadline = Instant::now() + timeout;
    while high > 0 && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.key() == Some(tx.marker_key.as_bytes()) {
                    last = m
                        .payload()
                        .and_then(|v| v.try_into().ok())
                        .map(u64::from_be_bytes);
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                // A broker restart or a leader election: retried until the deadline.
                tracing::warn!(error = %e, "reading the marker topic; retrying");
            }
            None => {}
        }
    }
    Ok(last)
}

/// Offsets `from..to` of `partition` were asked for and are not on the broker.
fn missing(partition: i32, from: i64, to: i64) {
    tracing::warn!(
        partition,
        from,
        to,
        "these offsets are not on the broker even when read from offset 0 \
         (deleted by retention or compaction?); continuing after them"
    );
}
