//! A deliberately naive reference of the QoS rules in DESIGN.md, written independently of the
//! library's window code: per partition in arrival order, a record is late when its partition's
//! watermark (largest earlier event time minus out-of-orderness) has reached its oldest
//! window's end plus grace; everything else counts in every window that contains it (windows
//! start every `advance`). Results hold for every window that closes
//! once all partitions have gone idle (the operator watermark is then the largest one).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use marquee::record::{EventType, PlaybackEvent, QosWindow};

/// Rule parameters, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub window: i64,
    /// A window starts every `advance` ms (`window` for tumbling windows).
    pub advance: i64,
    pub grace: i64,
    pub out_of_orderness: i64,
}

/// What the pipeline must produce.
#[derive(Debug, Default)]
pub struct Expected {
    /// Final results by output key.
    pub results: BTreeMap<String, QosWindow>,
    /// event_ids of late records.
    pub late: BTreeSet<String>,
}

/// Applies the rules to `per_partition` event sequences (in arrival order).
pub fn compute(rules: Rules, per_partition: &BTreeMap<i32, Vec<PlaybackEvent>>) -> Expected {
    let mut expected = Expected::default();
    let mut windows: BTreeMap<i64, Vec<&PlaybackEvent>> = BTreeMap::new();
    let mut final_watermark = i64::MIN;
    for events in per_partition.values() {
        let mut max_seen: Option<i64> = None;
        for e in events {
            // Every multiple of `advance` in (t - window, t].
            let newest = e.event_time.div_euclid(rules.advance) * rules.advance;
            let starts: Vec<i64> = (0..)
                .map(|k| newest - k * rules.advance)
                .take_while(|s| *s > e.event_time - rules.window)
                .collect();
            let oldest = *starts.last().expect("a window contains every time");
            let watermark = max_seen.map_or(i64::MIN, |m| m - rules.out_of_orderness);
            if watermark >= oldest + rules.window + rules.grace {
                expected.late.insert(e.event_id.clone());
            } else {
                for start in starts {
                    windows.entry(start).or_default().push(e);
                }
            }
            max_seen = Some(max_seen.map_or(e.event_time, |m| m.max(e.event_time)));
        }
        if let Some(m) = max_seen {
            final_watermark = final_watermark.max(m - rules.out_of_orderness);
        }
    }
    for (start, events) in windows {
        if final_watermark < start + rules.window + rules.grace {
            continue;
        }
        let mut groups: HashMap<(String, String), Vec<&PlaybackEvent>> = HashMap::new();
        for e in events {
            for (dim, value) in [
                ("all", "all"),
                ("cdn", e.cdn.as_str()),
                ("country", e.country.as_str()),
                ("device_type", e.device_type.as_str()),
            ] {
                groups
                    .entry((dim.into(), value.into()))
                    .or_default()
                    .push(e);
            }
        }
        for ((dimension, value), events) in groups {
            let play_ms: i64 = events.iter().map(|e| e.play_ms).sum();
            let rebuffer_ms: i64 = events.iter().map(|e| e.rebuffer_ms).sum();
            let viewers: BTreeSet<&str> = events
                .iter()
                .filter(|e| matches!(e.event_type, EventType::Play | EventType::Heartbeat))
                .map(|e| e.session_id.as_str())
                .collect();
            let w = QosWindow {
                window_start: start,
                window_end: start + rules.window,
                dimension,
                value,
                concurrent_viewers: viewers.len() as i64,
                play_ms,
                rebuffer_ms,
                rebuffer_events: events
                    .iter()
                    .filter(|e| e.event_type == EventType::RebufferStart)
                    .count() as i64,
                rebuffer_ratio: if play_ms + rebuffer_ms == 0 {
                    None
                } else {
                    Some(rebuffer_ms as f64 / (play_ms + rebuffer_ms) as f64)
                },
                is_final: true,
            };
            expected.results.insert(w.key(), w);
        }
    }
    expected
}
