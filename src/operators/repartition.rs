//! Repartition by profile: re-publishes each accepted event unchanged (same bytes and
//! timestamp), keyed by `profile_id`, to the partition of an internal topic that owns the
//! profile's table entries (`hash(profile) mod partitions`). Its outputs are flushed with the
//! task's checkpoint, before the input offsets move: at-least-once, and applying an event to
//! the table twice changes nothing.

use crate::state::Batch;

use crate::error::PipelineError;
use crate::runtime::{Context, Handled, Operator, Record};
use crate::state::PartitionMeta;
use crate::tools::gen::partition_for;

/// The repartition operator.
pub struct Repartition {
    topic: String,
    partitions: i32,
}

impl Repartition {
    /// Writes to `topic`, which has `partitions` partitions.
    pub fn new(topic: &str, partitions: i32) -> Self {
        Self {
            topic: topic.to_string(),
            partitions,
        }
    }
}

impl Operator for Repartition {
    fn name(&self) -> &'static str {
        "repartition"
    }

    fn assign(
        &mut self,
        _partition: i32,
        _checkpoint: Option<&PartitionMeta>,
    ) -> Result<(), PipelineError> {
        Ok(())
    }

    fn revoke(&mut self, _partition: i32) {}

    fn on_record(
        &mut self,
        ctx: &Context<'_>,
        record: &Record<'_>,
    ) -> Result<Handled, PipelineError> {
        let profile = &record.event.profile_id;
        ctx.sink.send_raw(
            &self.topic,
            profile.as_bytes(),
            record.value,
            partition_for(profile, self.partitions),
            record.origin.timestamp,
        )?;
        Ok(Handled::Applied)
    }

    fn stage(&mut self, _batch: &mut Batch) -> Result<(), PipelineError> {
        Ok(())
    }
}
