//! A deliberately naive reference of the QoS rules in DESIGN.md, written independently of the
//! library's window code: per partition in arrival order, a record is late when its partition's
//! watermark (largest earlier event time minus out-of-orderness) has reached its oldest
//! window's end plus grace; everything else counts in every window that contains it (windows
//! start every `advance`). Results hold for every window that closes
//! once all partitions have gone idle (the operator watermark is then the largest one).
//!
//! The QoE fields follow DESIGN.md's definitions over each session's accepted events, by
//! event time: its first START is an attempt; its first ERROR is a start failure unless a PLAY
//! came at or before it; its first END is an exit before start unless a PLAY came at or
//! before it or an ERROR before it; its first PLAY's startup_ms joins the startup times
//! (the first of one millisecond by the stable hash of event_id); every event's play_ms is
//! played at the bitrate of the newest PLAY or BITRATE_CHANGE with a bitrate at or before it.
//! Each counts in the windows containing the time of the event it comes from, in that
//! event's groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use marquee::record::{EventType, PlaybackEvent, QosWindow};
use marquee::session::stable_hash;

/// What one session contributes to one group of the windows containing `time`.
#[derive(Debug, Clone, Copy)]
enum Contribution {
    Attempt,
    Failure,
    Exit,
    Startup(i64),
    Played(i64, i64),
}

/// The QoE contributions of every session, from its accepted events.
fn contributions<'e>(accepted: &[&'e PlaybackEvent]) -> Vec<(&'e PlaybackEvent, Contribution)> {
    let mut sessions: HashMap<&str, Vec<&PlaybackEvent>> = HashMap::new();
    for e in accepted {
        sessions.entry(e.session_id.as_str()).or_default().push(e);
    }
    let mut out = Vec::new();
    for (_, mut events) in sessions {
        events.sort_by_key(|e| (e.event_time, stable_hash(&e.event_id)));
        let first = |kind: EventType| events.iter().find(|e| e.event_type == kind).copied();
        let times = |kind: EventType| {
            events
                .iter()
                .filter(move |e| e.event_type == kind)
                .map(|e| e.event_time)
        };
        if let Some(e) = first(EventType::Start) {
            out.push((e, Contribution::Attempt));
        }
        // Before = an earlier event time: events of one millisecond are not before each other.
        if let Some(e) = first(EventType::Error) {
            if times(EventType::Play).all(|p| e.event_time < p) {
                out.push((e, Contribution::Failure));
            }
        }
        if let Some(e) = first(EventType::End) {
            let no_play = times(EventType::Play).all(|p| e.event_time < p);
            if no_play && !times(EventType::Error).any(|x| x < e.event_time) {
                out.push((e, Contribution::Exit));
            }
        }
        if let Some(e) = first(EventType::Play) {
            if let Some(ms) = e.startup_ms {
                out.push((e, Contribution::Startup(ms)));
            }
        }
        for e in &events {
            // The newest PLAY or BITRATE_CHANGE with a bitrate at or before it.
            let bitrate = events
                .iter()
                .filter(|r| matches!(r.event_type, EventType::Play | EventType::BitrateChange))
                .filter(|r| r.bitrate_kbps.is_some() && r.event_time <= e.event_time)
                .max_by_key(|r| (r.event_time, stable_hash(&r.event_id)))
                .and_then(|r| r.bitrate_kbps);
            if let (true, Some(kbps)) = (e.play_ms > 0, bitrate) {
                out.push((e, Contribution::Played(i64::from(kbps), e.play_ms)));
            }
        }
    }
    out
}

/// The value at rank ⌊q·(n−1)⌋ of `sorted`.
pub fn quantile(sorted: &[i64], q: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[(q * (sorted.len() - 1) as f64) as usize] as f64)
}

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
    let mut accepted = Vec::new();
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
                accepted.push(e);
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
    let group_keys = |e: &PlaybackEvent| -> [(String, String); 4] {
        [
            ("all".into(), "all".into()),
            ("cdn".into(), e.cdn.clone()),
            ("country".into(), e.country.clone()),
            ("device_type".into(), e.device_type.clone()),
        ]
    };
    let contributions = contributions(&accepted);
    for (start, events) in windows {
        if final_watermark < start + rules.window + rules.grace {
            continue;
        }
        let mut groups: HashMap<(String, String), Vec<&PlaybackEvent>> = HashMap::new();
        for e in events {
            for key in group_keys(e) {
                groups.entry(key).or_default().push(e);
            }
        }
        let mut qoe: HashMap<(String, String), Vec<Contribution>> = HashMap::new();
        for (e, c) in &contributions {
            if (start..start + rules.window).contains(&e.event_time) {
                for key in group_keys(e) {
                    qoe.entry(key).or_default().push(*c);
                }
            }
        }
        for ((dimension, value), events) in groups {
            let mine = qoe
                .remove(&(dimension.clone(), value.clone()))
                .unwrap_or_default();
            let count =
                |f: fn(&Contribution) -> bool| Some(mine.iter().filter(|c| f(c)).count() as i64);
            let mut startups: Vec<i64> = mine
                .iter()
                .filter_map(|c| match c {
                    Contribution::Startup(ms) => Some(*ms),
                    _ => None,
                })
                .collect();
            startups.sort();
            let (weighted, played) = mine.iter().fold((0i128, 0i64), |(w, p), c| match c {
                Contribution::Played(kbps, ms) => (w + i128::from(*kbps) * i128::from(*ms), p + ms),
                _ => (w, p),
            });
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
                attempts: count(|c| matches!(c, Contribution::Attempt)),
                video_start_failures: count(|c| matches!(c, Contribution::Failure)),
                exits_before_video_start: count(|c| matches!(c, Contribution::Exit)),
                startup_ms_p50: quantile(&startups, 0.5),
                startup_ms_p90: quantile(&startups, 0.9),
                startup_ms_p99: quantile(&startups, 0.99),
                avg_bitrate_kbps: (played > 0).then(|| weighted as f64 / played as f64),
            };
            expected.results.insert(w.key(), w);
        }
    }
    expected
}

/// Distinct accounts and profiles of one day and group, and whether the day has closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daily {
    pub accounts: usize,
    pub profiles: usize,
    pub is_final: bool,
}

/// DAU by output key `<dimension>/<value>/<day>`: a record is late for its day only when its
/// partition's watermark has passed the day's end plus `grace` (a record late for its window
/// usually is not); a day is final once every partition's watermark has.
pub fn daily(
    out_of_orderness: i64,
    grace: i64,
    per_partition: &BTreeMap<i32, Vec<PlaybackEvent>>,
) -> BTreeMap<String, Daily> {
    const DAY: i64 = 86_400_000;
    type Ids<'e> = (BTreeSet<&'e str>, BTreeSet<&'e str>);
    let mut sets: BTreeMap<(i64, &str, String), Ids<'_>> = BTreeMap::new();
    let mut final_watermark = i64::MIN;
    for events in per_partition.values() {
        let mut max_seen: Option<i64> = None;
        for e in events {
            let day = e.event_time.div_euclid(DAY) * DAY;
            let watermark = max_seen.map_or(i64::MIN, |m| m - out_of_orderness);
            if watermark < day + DAY + grace {
                for (dimension, value) in [
                    ("all", "all"),
                    ("country", e.country.as_str()),
                    ("device_type", e.device_type.as_str()),
                ] {
                    let (accounts, profiles) =
                        sets.entry((day, dimension, value.to_string())).or_default();
                    accounts.insert(&e.account_id);
                    profiles.insert(&e.profile_id);
                }
            }
            max_seen = Some(max_seen.map_or(e.event_time, |m| m.max(e.event_time)));
        }
        if let Some(m) = max_seen {
            final_watermark = final_watermark.max(m - out_of_orderness);
        }
    }
    sets.into_iter()
        .map(|((day, dimension, value), (accounts, profiles))| {
            let key = marquee::record::DailyActive {
                day,
                dimension: dimension.into(),
                value,
                ..Default::default()
            }
            .key();
            let is_final = final_watermark >= day + DAY + grace;
            (
                key,
                Daily {
                    accounts: accounts.len(),
                    profiles: profiles.len(),
                    is_final,
                },
            )
        })
        .collect()
}
