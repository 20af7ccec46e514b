//! One instance's flow: source → decode → watermark → windows → state → emit.
//!
//! A single thread polls the consumer and runs every stage on each record, so no stage waits
//! on another and nothing is queued between them. Every `TICK_RECORDS` records (and on quiet
//! polls) the operator watermark is recomputed, closed windows are emitted and partitions
//! running ahead are paused. Every `checkpoint_interval`:
//!
//! 1. flush the producer: every result, late and dead-letter record sent so far is delivered;
//! 2. write one RocksDB batch: changed window state, deletions of emitted windows, and each
//!    partition's next offset and largest event time;
//! 3. commit those offsets to Kafka (for lag monitoring only).
//!
//! A crash between 1 and 2 replays from the previous checkpoint and re-emits identical keyed
//! records; a crash before 1 loses nothing, since no offset moved.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rocksdb::WriteBatch;
use tokio_util::sync::CancellationToken;

use crate::check::check;
use crate::config::{Dimension, QosConfig, Topology};
use crate::decode::Decoder;
use crate::error::PipelineError;
use crate::http::Health;
use crate::metrics::{self, PartitionCounters};
use crate::record::{Origin, QosWindow};
use crate::sink::Sink;
use crate::source::{Assignment, Landing, Reposition, Source};
use crate::state::{PartitionMeta, Store};
use crate::watermark::Watermarks;
use crate::window::{slot, PartitionWindows, WindowPartial, WindowSpec};

/// Name of this stage's offsets and watermarks in the meta column family.
const STAGE: &str = "qos";

/// Records between watermark ticks while data flows.
const TICK_RECORDS: u32 = 4096;
/// Longest time between watermark ticks.
const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// A gap between ticks longer than this is a stall of Marquee itself, not quiet of the data.
const STALL_GAP: Duration = Duration::from_secs(1);
/// How long a repositioned partition may deliver nothing while the broker holds records past
/// its position before it is sought back (see [`Reposition`]).
const REPOSITION_PATIENCE: Duration = Duration::from_secs(2);

/// Called with every final result as it is emitted (the demo prints them).
pub type ResultHook = Box<dyn FnMut(&QosWindow) + Send>;

/// State of one owned input partition.
struct PartitionState {
    /// Open windows of this partition's records.
    windows: PartitionWindows,
    /// Next offset to process; records below it are already in the state.
    next_offset: Option<i64>,
    /// Paused by watermark alignment.
    paused: bool,
    /// Set when the fetch position moved (assignment, resume): where the partition must
    /// continue, checked on its first record.
    reposition: Option<Reposition>,
    counters: PartitionCounters,
}

/// Everything but the consumer, so a borrowed message can be handled while it is held.
struct Core {
    spec: WindowSpec,
    dimensions: Vec<Dimension>,
    gauge_slots: Vec<u8>,
    max_future_skew: i64,
    decoder: Decoder,
    sink: Sink,
    store: Arc<Store>,
    marks: Watermarks,
    parts: BTreeMap<i32, PartitionState>,
    /// Highest operator watermark at which windows were closed: anything at or below is final.
    closed_through: i64,
    /// Emitted windows whose state is deleted at the next checkpoint.
    emitted: Vec<(i32, i64)>,
    topic: String,
    on_result: Option<ResultHook>,
    /// Wall clock of the current tick, for idleness.
    now: Instant,
    /// Records processed since the last tick.
    processed: u64,
    /// Seeks owed to partitions whose broker skipped past the position they need.
    seeks: Vec<(i32, i64)>,
    /// Gauges of the newest closed window.
    gauges: metrics::LastWindowGauges,
}

/// A running pipeline instance.
pub struct Pipeline {
    source: Source,
    core: Core,
    max_drift: i64,
    checkpoint_interval: Duration,
    health: Arc<Health>,
}

impl Pipeline {
    /// Wires the stages of `topology` together; nothing is consumed until [`Pipeline::run`].
    pub fn new(
        topology: &Topology,
        qos: &QosConfig,
        source: Source,
        decoder: Decoder,
        sink: Sink,
        store: Arc<Store>,
        health: Arc<Health>,
    ) -> Result<Self, PipelineError> {
        let closed_through = store.closed_through()?.unwrap_or(i64::MIN);
        let time = &topology.time;
        Ok(Self {
            core: Core {
                spec: WindowSpec::new(qos.window, qos.grace),
                dimensions: qos.dimensions.clone(),
                gauge_slots: qos.gauge_dimensions.iter().map(|d| slot(*d)).collect(),
                max_future_skew: time.max_future_skew.as_millis() as i64,
                decoder,
                sink,
                store,
                marks: Watermarks::new(time.out_of_orderness, time.idle_timeout),
                parts: BTreeMap::new(),
                closed_through,
                emitted: Vec::new(),
                topic: source.topic().to_string(),
                on_result: None,
                now: Instant::now(),
                processed: 0,
                seeks: Vec::new(),
                gauges: metrics::LastWindowGauges::default(),
            },
            source,
            max_drift: time.max_partition_drift.as_millis() as i64,
            checkpoint_interval: topology.state.checkpoint_interval,
            health,
        })
    }

    /// Calls `hook` with every final result as it is emitted.
    pub fn on_result(mut self, hook: ResultHook) -> Self {
        self.core.on_result = Some(hook);
        self
    }

    /// Runs until `shutdown`, then checkpoints once more and returns.
    pub fn run(mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let mut since_tick = 0u32;
        let mut last_tick = Instant::now();
        let mut last_checkpoint = Instant::now();
        while !shutdown.is_cancelled() {
            let polled = self.source.poll(Duration::from_millis(50));
            for change in self.source.take_assignments() {
                reassign(&self.source, &mut self.core, &self.health, change)?;
            }
            match polled {
                Some(Ok(message)) => {
                    self.core.handle(&message)?;
                    since_tick += 1;
                }
                Some(Err(KafkaError::PartitionEOF(p))) => self.core.marks.set_caught_up(p, true),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error; librdkafka retries"),
                None => since_tick = TICK_RECORDS,
            }
            self.core.apply_seeks(&self.source)?;
            if since_tick >= TICK_RECORDS || last_tick.elapsed() >= TICK_INTERVAL {
                self.tick()?;
                since_tick = 0;
                last_tick = Instant::now();
            }
            if last_checkpoint.elapsed() >= self.checkpoint_interval {
                checkpoint(&self.source, &mut self.core)?;
                last_checkpoint = Instant::now();
            }
        }
        self.tick()?;
        checkpoint(&self.source, &mut self.core)?;
        tracing::info!("pipeline stopped cleanly: outputs flushed, state and offsets checkpointed");
        Ok(())
    }

    /// Recomputes watermarks, emits closed windows, pauses or resumes partitions for alignment.
    fn tick(&mut self) -> Result<(), PipelineError> {
        let core = &mut self.core;
        let now = Instant::now();
        if now.saturating_duration_since(core.now) > STALL_GAP {
            core.marks.stalled(now);
            tracing::info!(
                stalled = ?now.saturating_duration_since(core.now),
                "Marquee did not look at its partitions for a while; idle clocks start again"
            );
        }
        core.now = now;
        self.health
            .add_processed(std::mem::take(&mut core.processed));
        let Some(watermark) = core.marks.operator(core.now) else {
            return Ok(());
        };
        tracing::trace!(watermark, closed_through = core.closed_through, "tick");
        core.close_windows(watermark)?;
        let now_ms = wall_clock_ms();
        let floor = core.marks.alignment_floor();
        for (&p, part) in core.parts.iter_mut() {
            let own = core.marks.partition(p);
            // A partition far ahead of the slowest one only grows open-window state: let the
            // others catch up first. Catching up never changes results, only memory. A paused
            // partition resumes once the others are within half the drift, so that each pause
            // (a fetch round trip on resume) lets the slow partitions catch up a good way.
            let limit = if part.paused {
                self.max_drift / 2
            } else {
                self.max_drift
            };
            let ahead =
                floor.is_some_and(|floor| own != i64::MIN && own.saturating_sub(floor) > limit);
            if ahead != part.paused {
                self.source.set_paused(p, ahead)?;
                core.marks.set_paused(p, ahead, core.now);
                part.paused = ahead;
                if ahead {
                    part.counters.paused_by_alignment();
                } else if let Some(next) = part.next_offset {
                    // librdkafka resumes at the record after the last one handed out, but
                    // not every broker serves a fetch from there: check where it lands.
                    part.reposition
                        .get_or_insert_with(|| Reposition::new(next, core.now));
                }
                tracing::debug!(partition = p, paused = ahead, "watermark alignment");
            }
            // Only a repositioned partition that delivers nothing needs the broker's end.
            if let Some(r) = part.reposition.as_mut().filter(|_| !part.paused) {
                let high = self.source.cached_high_watermark(p);
                match r.silent(high, REPOSITION_PATIENCE, core.now) {
                    Some(Landing::SeekBack(to)) => core.seeks.push((p, to)),
                    Some(Landing::Missing) => {
                        missing(p, r.target, high.unwrap_or(r.target));
                        part.reposition = None;
                    }
                    _ => {}
                }
            }
            let idle = core.marks.is_idle(p, core.now);
            part.counters.publish(own, now_ms, part.paused, idle);
        }
        core.apply_seeks(&self.source)?;
        let open: usize = core.parts.values().map(|p| p.windows.windows.len()).sum();
        metrics::windows_open(open);
        Ok(())
    }
}

/// Flushes outputs, writes state with offsets, then commits offsets to Kafka.
fn checkpoint(source: &Source, core: &mut Core) -> Result<(), PipelineError> {
    let offsets = core.checkpoint()?;
    source.commit(offsets);
    Ok(())
}

/// Restores newly assigned partitions; checkpoints, then drops, revoked ones.
fn reassign(
    source: &Source,
    core: &mut Core,
    health: &Health,
    change: Assignment,
) -> Result<(), PipelineError> {
    match change {
        Assignment::Assigned(partitions) => {
            for p in partitions {
                core.assign(p)?;
            }
            // Partitions owned by no one here still hold windows open (see `watermark`).
            let total = source.partition_count()?;
            for p in 0..total {
                let max = core
                    .store
                    .partition_meta(STAGE, p)?
                    .and_then(|m| m.max_event_time);
                core.marks.track(p, max, core.now);
            }
            if (core.parts.len() as i32) < total {
                tracing::warn!(
                    owned = core.parts.len(),
                    total,
                    "this instance owns only some input partitions: windows close once it owns all \
                     (or the rebalance settles); one instance per topology until the two-phase merge exists"
                );
            }
            // Ready once the assigned partitions' state is restored.
            health.set_ready("qos", true);
        }
        Assignment::Revoked(partitions) => {
            checkpoint(source, core)?;
            for p in partitions {
                core.parts.remove(&p);
                core.marks.disown(p);
            }
            tracing::info!(owned = ?core.parts.keys().collect::<Vec<_>>(), "partitions revoked");
        }
    }
    Ok(())
}

impl Core {
    fn assign(&mut self, p: i32) -> Result<(), PipelineError> {
        if self.parts.contains_key(&p) {
            return Ok(());
        }
        let meta = self.store.partition_meta(STAGE, p)?;
        let windows = self.store.load_windows(p)?;
        tracing::info!(
            partition = p,
            next_offset = ?meta.map(|m| m.next_offset),
            open_windows = windows.windows.len(),
            "partition assigned, state restored"
        );
        self.marks
            .assign(p, meta.and_then(|m| m.max_event_time), self.now);
        self.parts.insert(
            p,
            PartitionState {
                windows,
                next_offset: meta.map(|m| m.next_offset),
                paused: false,
                reposition: meta.map(|m| Reposition::new(m.next_offset, self.now)),
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
        let event = match self.decoder.decode(key, value)? {
            Ok(event) => event,
            Err(e) => {
                part.counters.dead_lettered(e.reason());
                return self.sink.send_dead_letter(key, value, origin, &e);
            }
        };
        part.counters.decoded();
        if let Err(e) = check(&event, origin.timestamp, self.max_future_skew) {
            part.counters.dead_lettered(e.reason());
            return self.sink.send_dead_letter(key, value, origin, &e);
        }
        let start = self.spec.start(event.event_time);
        let watermark = self.marks.partition(p).max(self.closed_through);
        if self.spec.is_closed(start, watermark) {
            part.counters.late();
            self.sink.send_late(key, value, origin, start, watermark)?;
        } else {
            part.windows.add(&self.spec, &self.dimensions, &event);
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
            source.seek(p, offset)?;
        }
        Ok(())
    }

    /// Merges and emits every window closed at operator watermark `watermark`.
    fn close_windows(&mut self, watermark: i64) -> Result<(), PipelineError> {
        let mut closed: BTreeMap<i64, WindowPartial> = BTreeMap::new();
        for (&p, part) in self.parts.iter_mut() {
            for (start, partial) in part.windows.take_closed(&self.spec, watermark) {
                closed.entry(start).or_default().merge(&partial);
                self.emitted.push((p, start));
            }
        }
        self.closed_through = self.closed_through.max(watermark);
        if closed.is_empty() {
            return Ok(());
        }
        let mut emitted = 0;
        let last = closed.keys().next_back().copied();
        let mut newest = Vec::new();
        for (start, partial) in &closed {
            for result in partial.results(&self.spec, *start) {
                self.sink.send_result(&result.key(), &result, None, &[])?;
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

    fn gauge_slot(&self, dimension: &str) -> bool {
        dimension == "all"
            || self
                .gauge_slots
                .iter()
                .any(|&s| crate::window::slot_name(s) == dimension)
    }

    /// Steps 1 and 2 of a checkpoint; returns the offsets to commit to Kafka.
    fn checkpoint(&mut self) -> Result<Vec<(i32, i64)>, PipelineError> {
        let started = Instant::now();
        self.sink.flush()?;
        let flushed = Instant::now();
        let mut batch = WriteBatch::default();
        for (p, start) in self.emitted.drain(..) {
            self.store.stage_window_delete(&mut batch, p, start);
        }
        let mut offsets = Vec::with_capacity(self.parts.len());
        for (&p, part) in self.parts.iter_mut() {
            self.store.stage_windows(&mut batch, p, &mut part.windows);
            if let Some(next_offset) = part.next_offset {
                let meta = PartitionMeta {
                    next_offset,
                    max_event_time: self.marks.max_event_time(p),
                };
                self.store.stage_meta(&mut batch, STAGE, p, meta);
                offsets.push((p, next_offset));
            }
        }
        if self.closed_through != i64::MIN {
            self.store
                .stage_closed_through(&mut batch, self.closed_through);
        }
        self.store.commit(batch)?;
        metrics::checkpoint(flushed - started, flushed.elapsed());
        metrics::state_size(self.store.size_bytes());
        Ok(offsets)
    }
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

/// Milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
