//! Per-partition watermarks, idle partitions and the operator watermark.
//!
//! A partition's watermark is the largest event time it has delivered minus the allowed
//! out-of-orderness: records with event times below it are no longer expected. The operator
//! watermark is the minimum over the partitions this instance owns except those that have gone
//! idle: caught up with everything the broker holds and without a record for the idle timeout
//! (a stall of Marquee itself restarts that clock). Partitions owned elsewhere count where
//! the partitions meet: the merge of partial aggregates waits for every input partition's
//! progress, whoever owns it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The clock of one input partition.
#[derive(Debug, Clone)]
struct PartitionClock {
    /// Largest trusted event time delivered so far (restored from the checkpoint).
    max_event_time: Option<i64>,
    /// Wall-clock time of the last record; drives idleness.
    last_activity: Instant,
    /// Paused by watermark alignment: never idle, since it is quiet on purpose.
    paused: bool,
    /// The consumer has read everything the broker holds for it (as of the last tick).
    caught_up: bool,
}

/// Watermarks of the partitions this instance owns.
#[derive(Debug, Clone)]
pub struct Watermarks {
    out_of_orderness: i64,
    idle_timeout: Duration,
    partitions: BTreeMap<i32, PartitionClock>,
}

impl Watermarks {
    /// Tracks watermarks with the given out-of-orderness and idle timeout.
    pub fn new(out_of_orderness: Duration, idle_timeout: Duration) -> Self {
        Self {
            out_of_orderness: out_of_orderness.as_millis() as i64,
            idle_timeout,
            partitions: BTreeMap::new(),
        }
    }

    /// This instance now owns `partition`, restored to its checkpointed event time.
    pub fn assign(&mut self, partition: i32, max_event_time: Option<i64>, now: Instant) {
        self.partitions.insert(
            partition,
            PartitionClock {
                max_event_time,
                last_activity: now,
                paused: false,
                caught_up: false,
            },
        );
    }

    /// This instance no longer owns `partition`.
    pub fn disown(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// A record arrived on `partition` (decodable or not): it is neither idle nor caught up.
    pub fn touch(&mut self, partition: i32, now: Instant) {
        if let Some(clock) = self.partitions.get_mut(&partition) {
            clock.last_activity = now;
            clock.caught_up = false;
        }
    }

    /// Marquee itself did not look at its partitions for a while (a slow flush, a registry
    /// outage, a long state load, a stopped process): quiet that it could not observe is not
    /// idleness of the data, so every partition's idle clock starts again.
    pub fn stalled(&mut self, now: Instant) {
        for clock in self.partitions.values_mut() {
            clock.last_activity = now;
        }
    }

    /// A trusted event time was delivered on `partition`.
    pub fn observe(&mut self, partition: i32, event_time: i64) {
        if let Some(clock) = self.partitions.get_mut(&partition) {
            clock.max_event_time = Some(
                clock
                    .max_event_time
                    .map_or(event_time, |m| m.max(event_time)),
            );
        }
    }

    /// Marks `partition` paused (or resumed) by watermark alignment.
    pub fn set_paused(&mut self, partition: i32, paused: bool, now: Instant) {
        if let Some(clock) = self.partitions.get_mut(&partition) {
            clock.paused = paused;
            clock.last_activity = now;
        }
    }

    /// The consumer has read everything the broker holds for `partition` (partition EOF).
    pub fn set_caught_up(&mut self, partition: i32, caught_up: bool) {
        if let Some(clock) = self.partitions.get_mut(&partition) {
            clock.caught_up = caught_up;
        }
    }

    /// The watermark that alignment holds partitions to: the minimum over owned partitions that
    /// still have records to read. A partition that has not delivered an event yet counts as
    /// `i64::MIN`, so the others wait for it rather than run ahead. `None` when no owned
    /// partition has anything to read.
    pub fn alignment_floor(&self) -> Option<i64> {
        self.partitions
            .iter()
            .filter(|(_, c)| !c.caught_up)
            .map(|(&p, _)| self.partition(p))
            .min()
    }

    /// Largest event time delivered on `partition`, as stored in checkpoints.
    pub fn max_event_time(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|c| c.max_event_time)
    }

    /// The watermark of `partition`, `i64::MIN` before its first event.
    pub fn partition(&self, partition: i32) -> i64 {
        self.max_event_time(partition)
            .map_or(i64::MIN, |m| m.saturating_sub(self.out_of_orderness))
    }

    /// Whether `partition` is idle: owned, caught up with everything the broker holds, and
    /// without a record for the idle timeout. Paused partitions never are, and neither is a
    /// partition with records still to read, however long Marquee takes to read them.
    pub fn is_idle(&self, partition: i32, now: Instant) -> bool {
        self.partitions.get(&partition).is_some_and(|c| {
            !c.paused
                && c.caught_up
                && now.saturating_duration_since(c.last_activity) >= self.idle_timeout
        })
    }

    /// The operator watermark: the minimum over partitions that are not idle. When every
    /// partition is idle the stream is quiet, and the largest watermark is used so the last
    /// windows still close. `None` while no partition is tracked.
    pub fn operator(&self, now: Instant) -> Option<i64> {
        let active = self
            .partitions
            .keys()
            .filter(|&&p| !self.is_idle(p, now))
            .map(|&p| self.partition(p))
            .min();
        active.or_else(|| self.partitions.keys().map(|&p| self.partition(p)).max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks() -> Watermarks {
        Watermarks::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    #[test]
    fn a_revoked_partition_no_longer_counts() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(2_000), now);
        w.assign(1, Some(9_000), now);
        assert_eq!(w.operator(now), Some(1_900));
        w.disown(0);
        assert_eq!(w.operator(now), Some(8_900));
    }

    #[test]
    fn watermark_trails_the_largest_event_time() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, None, now);
        assert_eq!(w.partition(0), i64::MIN);
        w.observe(0, 1_000);
        w.observe(0, 900);
        assert_eq!(w.partition(0), 900);
    }

    #[test]
    fn operator_is_the_minimum_over_active_partitions() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(5_000), now);
        w.assign(1, Some(2_000), now);
        assert_eq!(w.operator(now), Some(1_900));
        // Partition 1 goes quiet at its end; only partition 0 is active after the timeout.
        w.set_caught_up(1, true);
        let later = now + Duration::from_secs(11);
        w.touch(0, later);
        assert_eq!(w.operator(later), Some(4_900));
    }

    #[test]
    fn a_new_empty_partition_holds_back_until_idle() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(5_000), now);
        w.assign(1, None, now);
        assert_eq!(w.operator(now), Some(i64::MIN));
        w.set_caught_up(1, true);
        let later = now + Duration::from_secs(11);
        w.touch(0, later);
        assert_eq!(w.operator(later), Some(4_900));
    }

    #[test]
    fn all_idle_uses_the_largest_watermark_and_paused_is_never_idle() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(5_000), now);
        w.assign(1, Some(2_000), now);
        w.set_caught_up(0, true);
        w.set_caught_up(1, true);
        let later = now + Duration::from_secs(11);
        assert_eq!(w.operator(later), Some(4_900));
        w.set_paused(0, true, now);
        assert!(!w.is_idle(0, later));
        assert_eq!(w.operator(later), Some(4_900));
    }

    #[test]
    fn alignment_waits_for_partitions_with_records_to_read_only() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(5_000), now);
        w.assign(1, None, now);
        assert_eq!(w.alignment_floor(), Some(i64::MIN), "1 has not started yet");
        w.set_caught_up(1, true);
        assert_eq!(w.alignment_floor(), Some(4_900));
        w.set_caught_up(0, true);
        assert_eq!(w.alignment_floor(), None, "nothing left to read");
        w.touch(1, now);
        assert_eq!(
            w.alignment_floor(),
            Some(i64::MIN),
            "a record means more may follow"
        );
    }

    #[test]
    fn idle_needs_caught_up_and_a_stall_of_marquee_is_not_quiet() {
        let now = Instant::now();
        let mut w = marks();
        w.assign(0, Some(5_000), now);
        let later = now + Duration::from_secs(11);
        assert!(
            !w.is_idle(0, later),
            "records may still be waiting on the broker"
        );
        w.set_caught_up(0, true);
        assert!(w.is_idle(0, later));
        w.stalled(later);
        assert!(!w.is_idle(0, later + Duration::from_secs(9)));
        assert!(w.is_idle(0, later + Duration::from_secs(10)));
    }

    proptest::proptest! {
        #[test]
        fn partition_watermarks_never_go_backwards(times in proptest::collection::vec(-1_000_000i64..1_000_000, 1..200)) {
            let now = Instant::now();
            let mut w = marks();
            w.assign(3, None, now);
            let mut last = i64::MIN;
            for t in times {
                w.observe(3, t);
                let wm = w.partition(3);
                proptest::prop_assert!(wm >= last);
                last = wm;
            }
        }
    }
}
