//! The runtime: runs any set of operators over one input topic and knows none of them.
//!
//! A [`Task`] owns what every operator shares: the consumer and its assignments, exact
//! positions, decoding and the bad-data rules (each record decoded and checked once, a bad one
//! dead-lettered once), per-partition watermarks and alignment, the checkpoint protocol, health
//! and the per-partition metrics. An [`Operator`] owns only its state, its update rule, what it
//! emits and when: it is handed each accepted event, each advance of the operator watermark
//! (event time: final results) and each wall-clock tick (early results, rate limits).

pub mod merge;
pub mod standby;
mod task;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use task::{Task, TaskOptions, Transactions};

use crate::error::PipelineError;
use crate::io::sink::Sink;
use crate::record::{Origin, PlaybackEvent};
use crate::state::PartitionMeta;

/// One accepted input record as operators see it.
pub struct Record<'a> {
    /// The decoded event; it passed every bad-data rule.
    pub event: &'a PlaybackEvent,
    /// Where it came from.
    pub origin: Origin,
    /// The original key and value bytes (for late copies and internal topics).
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The watermark of the record's partition before this record: lateness is judged on it.
    pub watermark: i64,
}

/// What an operator did with a record, for the partition's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Applied to the operator's state (or forwarded).
    Applied,
    /// Too late for the operator's window starting at `window_start`, judged at
    /// `watermark`: it changed nothing there. The runtime writes the record unchanged to the
    /// late topic, once however many operators found it late.
    Late { window_start: i64, watermark: i64 },
}

/// What an operator may use while it handles a record, a watermark or a tick.
pub struct Context<'a> {
    /// The task's producer: operator outputs are flushed with every checkpoint.
    pub sink: &'a Sink,
    /// The wall clock of the current tick.
    pub now: Instant,
    /// The owned input partitions' watermarks and idleness as of the last tick.
    pub partitions: &'a [PartitionMark],
}

/// An owned input partition's watermark and idleness at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMark {
    pub partition: i32,
    pub watermark: i64,
    pub idle: bool,
}

/// A unit of stream processing that the runtime drives. The checkpoint order is fixed by the
/// runtime: [`Operator::before_flush`] → flush outputs → [`Operator::stage`] into the one
/// RocksDB batch with offsets and watermarks → commit → [`Operator::committable`].
pub trait Operator: Send {
    /// Name in logs.
    fn name(&self) -> &'static str;

    /// Loads the state of a newly assigned input partition; `checkpoint` is the task's last
    /// checkpoint of it (its next offset and largest event time), if any.
    fn assign(
        &mut self,
        partition: i32,
        checkpoint: Option<&PartitionMeta>,
    ) -> Result<(), PipelineError>;

    /// Forgets a revoked partition; its state was checkpointed just before.
    fn revoke(&mut self, partition: i32);

    /// Handles one accepted record.
    fn on_record(
        &mut self,
        ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError>;

    /// The operator watermark (the event time below which no more records are expected)
    /// reached `watermark`: emit what it completes.
    fn on_watermark(&mut self, _ctx: &Context<'_>, _watermark: i64) -> Result<(), PipelineError> {
        Ok(())
    }

    /// A wall-clock tick (about every 100 ms while the task runs).
    fn on_tick(&mut self, _ctx: &Context<'_>) -> Result<(), PipelineError> {
        Ok(())
    }

    /// Checkpoint step 0: send what is owed before the flush (`all` on shutdown/revocation).
    fn before_flush(&mut self, _ctx: &Context<'_>, _all: bool) -> Result<(), PipelineError> {
        Ok(())
    }

    /// Checkpoint step 2: stage the state changed since the last checkpoint.
    fn stage(&mut self, batch: &mut crate::state::Batch) -> Result<(), PipelineError>;

    /// Checkpoint step 4: of `offsets` (just made durable), those safe to commit to Kafka, or
    /// earlier ones, or none. The default commits them all.
    fn committable(
        &mut self,
        offsets: Vec<(i32, i64)>,
        _now: Instant,
        _all: bool,
    ) -> Option<Vec<(i32, i64)>> {
        Some(offsets)
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
