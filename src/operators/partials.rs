//! The internal topic between the two phases of the QoS and DAU aggregations: each input
//! partition's aggregate of a window (or day) and group (phase one, on the instance that owns
//! the partition), and each input partition's progress; the merge (phase two) owns every
//! window, day and group of its partitions of this topic and closes a window or day once every
//! input partition has.
//!
//! Distinct ids (DAU) are not additive, so a day's partials are sets: exact ids go as the
//! hashes each partition gained since its previous record, each record keyed by its content
//! (a replay rewrites the same key; the merge takes the union), and a sketch goes whole under
//! one key per partition, group and day.
//!
//! The topic is compacted and keyed so that it is also the merge's state: a partial is
//! replaced by the partition's newer one, the merge deletes a window's partials once it has
//! emitted it, and its frontier record says which windows are done. A replayed partial is
//! identical to the one it replaces, so replays after a crash change nothing.

use std::collections::BTreeMap;

use crate::daily::Active;
use crate::error::PipelineError;
use crate::runtime::Context;
use crate::state::keys::{time_bytes, time_from};
use crate::state::{decode_group, decode_qoe, encode_group, encode_qoe};
use crate::window::GroupAgg;

/// Where phase one writes: the internal partials topic and its partition count.
#[derive(Debug, Clone)]
pub struct PartialsTopic {
    pub topic: String,
    pub partitions: i32,
}

/// The progress last written per owned input partition: (watermark, idle, closed through).
pub type SentProgress = BTreeMap<i32, (i64, bool, i64)>;

/// Writes the progress (as `record` makes it) of each owned partition in `closed` that changed
/// since `sent`, to every partition of the partials topic, after the partials it covers.
pub fn send_progress(
    ctx: &Context<'_>,
    partials: &PartialsTopic,
    closed: &BTreeMap<i32, i64>,
    sent: &mut SentProgress,
    record: fn(i32, i64, bool, i64) -> PartialRecord,
) -> Result<(), PipelineError> {
    for mark in ctx.partitions {
        let Some(&closed) = closed.get(&mark.partition) else {
            continue;
        };
        let now = (mark.watermark, mark.idle, closed);
        if sent.get(&mark.partition) == Some(&now) {
            continue;
        }
        sent.insert(mark.partition, now);
        let (key, value) = record(mark.partition, now.0, now.1, now.2).encode();
        for to in 0..partials.partitions {
            ctx.sink
                .send_raw(&partials.topic, &key, value.as_deref(), to, None)?;
        }
    }
    Ok(())
}

/// One record of the internal topic.
#[derive(Debug, Clone, PartialEq)]
pub enum PartialRecord {
    /// Input partition `source`'s aggregate of one window and group; `None` once the merge
    /// has emitted the window (a tombstone).
    Partial {
        start: i64,
        slot: u8,
        group: String,
        source: i32,
        agg: Option<Box<GroupAgg>>,
    },
    /// How far input partition `source` is: its watermark, whether it is idle, and the
    /// watermark through which its owner has closed windows (every partial of a window it
    /// closed was written before this record, in this same partition of the topic).
    Progress {
        source: i32,
        watermark: i64,
        idle: bool,
        closed_through: i64,
    },
    /// The merge has emitted every window closed at this watermark.
    Frontier(i64),
    /// Ids input partition `source` has seen on `day` in one group (`part` tells its records
    /// apart); `None` once the merge has emitted the day.
    Day {
        day: i64,
        slot: u8,
        group: String,
        source: i32,
        part: u64,
        ids: Option<Box<Active>>,
    },
    /// [`PartialRecord::Progress`] of the DAU days.
    DayProgress {
        source: i32,
        watermark: i64,
        idle: bool,
        closed_through: i64,
    },
    /// The merge has emitted every day closed at this watermark.
    DayFrontier(i64),
}

const PARTIAL: u8 = b'P';
const PROGRESS: u8 = b'H';
const FRONTIER: u8 = b'F';
const DAY: u8 = b'D';
const DAY_PROGRESS: u8 = b'E';
const DAY_FRONTIER: u8 = b'G';

/// The `part` of a day record holding `ids`: a sketch has one record per partition, group
/// and day (replaced as it grows), exact ids one per content (a replay rewrites the same).
pub fn day_part(ids: &Active) -> u64 {
    if ids.accounts.is_exact() {
        wyhash::wyhash(&ids.encode(), 0) | 1
    } else {
        0
    }
}

/// The partition of the internal topic that owns a window and group.
pub fn partition_of(start: i64, slot: u8, group: &str, partitions: i32) -> i32 {
    let key = format!("{start}/{slot}/{group}");
    (crate::session::stable_hash(&key) % partitions.max(1) as u64) as i32
}

impl PartialRecord {
    /// The deletion of input partition `source`'s partial of one window and group.
    pub fn tombstone(start: i64, slot: u8, group: String, source: i32) -> Self {
        Self::Partial {
            start,
            slot,
            group,
            source,
            agg: None,
        }
    }

    /// The record's key and value (`None`: a tombstone).
    pub fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            Self::Partial {
                start,
                slot,
                group,
                source,
                agg,
            } => {
                let mut key = Vec::with_capacity(14 + group.len());
                key.push(PARTIAL);
                key.extend_from_slice(&time_bytes(*start));
                key.push(*slot);
                key.extend_from_slice(&source.to_be_bytes());
                key.extend_from_slice(group.as_bytes());
                let value = agg.as_ref().map(|agg| {
                    let mut group = Vec::new();
                    encode_group(agg, &mut group);
                    let mut value = (group.len() as u32).to_le_bytes().to_vec();
                    value.extend_from_slice(&group);
                    value.extend_from_slice(&encode_qoe(&agg.qoe));
                    value
                });
                (key, value)
            }
            Self::Progress {
                source,
                watermark,
                idle,
                closed_through,
            } => progress(PROGRESS, *source, *watermark, *idle, *closed_through),
            Self::DayProgress {
                source,
                watermark,
                idle,
                closed_through,
            } => progress(DAY_PROGRESS, *source, *watermark, *idle, *closed_through),
            Self::Frontier(watermark) => (vec![FRONTIER], Some(watermark.to_le_bytes().to_vec())),
            Self::DayFrontier(watermark) => {
                (vec![DAY_FRONTIER], Some(watermark.to_le_bytes().to_vec()))
            }
            Self::Day {
                day,
                slot,
                group,
                source,
                part,
                ids,
            } => {
                let mut key = Vec::with_capacity(22 + group.len());
                key.push(DAY);
                key.extend_from_slice(&time_bytes(*day));
                key.push(*slot);
                key.extend_from_slice(&source.to_be_bytes());
                key.extend_from_slice(&part.to_be_bytes());
                key.extend_from_slice(group.as_bytes());
                (key, ids.as_ref().map(|ids| ids.encode()))
            }
        }
    }

    /// Reads a record of the internal topic; `None` when it is not one (or a tombstone of
    /// anything but a partial, which the merge never writes).
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Option<Self> {
        let (&kind, rest) = key.split_first()?;
        let i64_at =
            |b: &[u8], i: usize| Some(i64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        match kind {
            PARTIAL => {
                let start = time_from(rest.get(0..8)?.try_into().ok()?);
                let slot = *rest.get(8)?;
                let source = i32::from_be_bytes(rest.get(9..13)?.try_into().ok()?);
                let group = String::from_utf8(rest.get(13..)?.to_vec()).ok()?;
                let agg = match value {
                    None => None,
                    Some(v) => {
                        let len = u32::from_le_bytes(v.get(0..4)?.try_into().ok()?) as usize;
                        let mut agg = decode_group(v.get(4..4 + len)?)?;
                        agg.qoe = decode_qoe(v.get(4 + len..)?)?;
                        Some(Box::new(agg))
                    }
                };
                Some(Self::Partial {
                    start,
                    slot,
                    group,
                    source,
                    agg,
                })
            }
            PROGRESS => {
                let v = value?;
                Some(Self::Progress {
                    source: i32::from_be_bytes(rest.get(0..4)?.try_into().ok()?),
                    watermark: i64_at(v, 0)?,
                    idle: *v.get(8)? == 1,
                    closed_through: i64_at(v, 9)?,
                })
            }
            FRONTIER => Some(Self::Frontier(i64_at(value?, 0)?)),
            DAY_PROGRESS => {
                let v = value?;
                Some(Self::DayProgress {
                    source: i32::from_be_bytes(rest.get(0..4)?.try_into().ok()?),
                    watermark: i64_at(v, 0)?,
                    idle: *v.get(8)? == 1,
                    closed_through: i64_at(v, 9)?,
                })
            }
            DAY_FRONTIER => Some(Self::DayFrontier(i64_at(value?, 0)?)),
            DAY => {
                let ids = match value {
                    None => None,
                    Some(v) => Some(Box::new(Active::decode(v)?)),
                };
                Some(Self::Day {
                    day: time_from(rest.get(0..8)?.try_into().ok()?),
                    slot: *rest.get(8)?,
                    source: i32::from_be_bytes(rest.get(9..13)?.try_into().ok()?),
                    part: u64::from_be_bytes(rest.get(13..21)?.try_into().ok()?),
                    group: String::from_utf8(rest.get(21..)?.to_vec()).ok()?,
                    ids,
                })
            }
            _ => None,
        }
    }
}

/// A progress record of `kind`.
fn progress(
    kind: u8,
    source: i32,
    watermark: i64,
    idle: bool,
    closed_through: i64,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut key = vec![kind];
    key.extend_from_slice(&source.to_be_bytes());
    let mut value = watermark.to_le_bytes().to_vec();
    value.push(u8::from(idle));
    value.extend_from_slice(&closed_through.to_le_bytes());
    (key, Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip(
            start in any::<i64>(), slot in 0u8..4, group in "[a-z/\\x00é]{0,12}", source in 0i32..1000,
            counters in (any::<i64>(), any::<i64>(), any::<i64>()),
            viewers in proptest::collection::hash_set(any::<u64>(), 0..20),
            startups in proptest::collection::vec(1i64..10_000_000, 0..10),
            attempts in any::<i64>(), watermark in any::<i64>(), idle in any::<bool>(),
        ) {
            let mut agg = GroupAgg {
                play_ms: counters.0,
                rebuffer_ms: counters.1,
                rebuffer_events: counters.2,
                viewers: viewers.into_iter().collect(),
                ..GroupAgg::default()
            };
            agg.qoe.attempts = attempts;
            for ms in startups {
                agg.qoe.add(crate::session::Fact::Startup(Some(ms)));
            }
            let records = [
                PartialRecord::Partial { start, slot, group: group.clone(), source, agg: Some(Box::new(agg)) },
                PartialRecord::Partial { start, slot, group, source, agg: None },
                PartialRecord::Progress { source, watermark, idle, closed_through: start },
                PartialRecord::Frontier(watermark),
                PartialRecord::DayProgress { source, watermark, idle, closed_through: start },
                PartialRecord::DayFrontier(watermark),
            ];
            for record in records {
                let (key, value) = record.encode();
                let back = PartialRecord::decode(&key, value.as_deref()).unwrap();
                match (&back, &record) {
                    (
                        PartialRecord::Partial { agg: Some(a), .. },
                        PartialRecord::Partial { agg: Some(b), .. },
                    ) => {
                        prop_assert_eq!(&a.viewers, &b.viewers);
                        prop_assert_eq!(a.qoe.attempts, b.qoe.attempts);
                        prop_assert_eq!(a.qoe.startup.count(), b.qoe.startup.count());
                        prop_assert_eq!(a.play_ms, b.play_ms);
                    }
                    _ => prop_assert_eq!(back, record),
                }
            }
        }

        #[test]
        fn day_records_round_trip(
            day in any::<i64>(), slot in 0u8..3, group in "[a-z/\\x00é]{0,12}", source in 0i32..1000,
            ids in proptest::collection::vec(any::<u64>(), 0..50), exact: bool,
        ) {
            let mut active = Active::new(exact);
            for id in ids {
                active.accounts.insert(id);
                active.profiles.insert(id.rotate_left(7));
            }
            let part = day_part(&active);
            for ids in [Some(Box::new(active)), None] {
                let record = PartialRecord::Day { day, slot, group: group.clone(), source, part, ids };
                let (key, value) = record.encode();
                prop_assert_eq!(PartialRecord::decode(&key, value.as_deref()), Some(record));
            }
        }
    }
}
