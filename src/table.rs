//! The resume-position table: per (profile_id, title_id), the playhead of the newest event by
//! `(event_time, event_id)`, never by arrival order. Applying the same events in any order
//! gives the same table, and applying an event twice changes nothing, so replays and
//! repartitioning need no deduplication.

use crate::record::{PlaybackEvent, ResumePosition};

/// A table entry: the published position plus the event id that orders ties.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub position: ResumePosition,
    /// event_id of the newest event; breaks event-time ties deterministically.
    pub event_id: String,
}

/// What applying one event did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The event is the newest for its key: this is the new entry.
    Updated(Entry),
    /// An entry at least as new exists; nothing changed.
    OutOfDate,
}

/// Applies `event` to the current entry of its key.
pub fn apply(current: Option<&Entry>, event: &PlaybackEvent, completion_threshold: f64) -> Applied {
    if let Some(current) = current {
        let newer = (event.event_time, event.event_id.as_str())
            > (current.position.updated_at, current.event_id.as_str());
        if !newer {
            return Applied::OutOfDate;
        }
    }
    // The runtime is kept from an earlier event when this one does not carry it.
    let duration_ms = event
        .duration_ms
        .or_else(|| current.and_then(|c| c.position.duration_ms))
        .filter(|d| *d > 0);
    let progress = duration_ms.map(|d| event.position_ms as f64 / d as f64);
    Applied::Updated(Entry {
        position: ResumePosition {
            profile_id: event.profile_id.clone(),
            title_id: event.title_id.clone(),
            position_ms: event.position_ms,
            duration_ms,
            progress,
            completed: progress.is_some_and(|p| p >= completion_threshold),
            updated_at: event.event_time,
            device_type: event.device_type.clone(),
        },
        event_id: event.event_id.clone(),
    })
}

/// The table key of an event (its output key, see [`crate::record::resume_key`]).
pub fn key_of(event: &PlaybackEvent) -> String {
    crate::record::resume_key(&event.profile_id, &event.title_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::gen::{GenOptions, Generator};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn run(events: &[PlaybackEvent]) -> BTreeMap<String, Entry> {
        let mut table = BTreeMap::new();
        for e in events {
            if let Applied::Updated(entry) = apply(table.get(&key_of(e)), e, 0.95) {
                table.insert(key_of(e), entry);
            }
        }
        table
    }

    #[test]
    fn an_older_event_arriving_later_does_not_move_the_position_back() {
        let mut events: Vec<_> = Generator::new(GenOptions::default())
            .take(50)
            .map(|a| a.event)
            .collect();
        let session = events[0].session_id.clone();
        events.retain(|e| e.session_id == session);
        events.sort_by_key(|e| e.event_time);
        let newest = events.last().unwrap().clone();
        let mut reversed = events.clone();
        reversed.reverse();
        let table = run(&reversed);
        assert_eq!(
            table[&key_of(&newest)].position.position_ms,
            newest.position_ms
        );
        assert_eq!(
            table[&key_of(&newest)].position.updated_at,
            newest.event_time
        );
    }

    #[test]
    fn completion_follows_the_threshold_and_a_newer_event_restarts_it() {
        let mut e = Generator::new(GenOptions::default()).next().unwrap().event;
        e.duration_ms = Some(1_000);
        e.position_ms = 960;
        let Applied::Updated(done) = apply(None, &e, 0.95) else {
            panic!()
        };
        assert!(done.position.completed);
        assert_eq!(done.position.progress, Some(0.96));
        e.event_time += 1;
        e.position_ms = 10;
        e.duration_ms = None;
        let Applied::Updated(again) = apply(Some(&done), &e, 0.95) else {
            panic!()
        };
        assert!(
            !again.position.completed,
            "a newer event at the start restarts the title"
        );
        assert_eq!(
            again.position.duration_ms,
            Some(1_000),
            "runtime carried over"
        );
        assert_eq!(
            apply(Some(&again), &e, 0.95),
            Applied::OutOfDate,
            "applying twice changes nothing"
        );
    }

    proptest! {
        /// For any arrival order (and duplicates) of the same events, the table ends the same.
        #[test]
        fn any_arrival_order_gives_the_same_table(seed in 0u64..1_000, shuffle in any::<u64>()) {
            let events: Vec<_> = Generator::new(GenOptions { seed, accounts: 20, titles: 5, ..GenOptions::default() })
                .take(300)
                .map(|a| a.event)
                .collect();
            let mut shuffled = events.clone();
            shuffled.extend(events.iter().step_by(7).cloned());
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(shuffle);
            rand::seq::SliceRandom::shuffle(shuffled.as_mut_slice(), &mut rng);
            prop_assert_eq!(run(&events), run(&shuffled));
        }
    }
}
