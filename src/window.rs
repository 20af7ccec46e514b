//! Tumbling and hopping event-time windows: pure window math, the QoS aggregate of one window
//! and group, and the open windows of one input partition.
//!
//! Windows `[start, start + size)` start every `advance` (= `size` for tumbling windows), so an
//! event belongs to `size / advance` windows. A window closes when the watermark reaches
//! `end + grace`. A record is on time for all its windows or late for all: it is late when the
//! earliest of them has closed by its own partition's watermark (or was already emitted), and
//! then it changes nothing.

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use std::time::Duration;

use sketches_ddsketch::{Config, DDSketch};

use crate::config::Dimension;
use crate::record::{rebuffer_ratio, EventType, PlaybackEvent, QosWindow};
use crate::session::{Dims, Fact};

/// Size, advance and grace of windows, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: i64,
    /// A window starts every `advance`; equal to `size` for tumbling windows, and dividing it.
    pub advance: i64,
    pub grace: i64,
}

impl WindowSpec {
    /// Windows of `size` starting every `advance`, accepting records until the watermark
    /// reaches `end + grace`.
    pub fn new(size: Duration, advance: Duration, grace: Duration) -> Self {
        Self {
            size: size.as_millis() as i64,
            advance: advance.as_millis() as i64,
            grace: grace.as_millis() as i64,
        }
    }

    /// Tumbling windows of `size` ms with `grace` ms.
    pub fn tumbling(size: i64, grace: i64) -> Self {
        Self {
            size,
            advance: size,
            grace,
        }
    }

    /// Start of the newest window containing event time `t` (windows are aligned to the
    /// epoch).
    ///
    /// ```
    /// # use marquee::window::WindowSpec;
    /// let w = WindowSpec::tumbling(60_000, 0);
    /// assert_eq!(w.start(119_999), 60_000);
    /// assert_eq!(w.start(-1), -60_000);
    /// ```
    pub fn start(&self, t: i64) -> i64 {
        t.div_euclid(self.advance) * self.advance
    }

    /// Start of the oldest window containing `t`: the first to close, so lateness is judged
    /// on it.
    ///
    /// ```
    /// # use marquee::window::WindowSpec;
    /// let w = WindowSpec { size: 300, advance: 100, grace: 0 };
    /// assert_eq!(w.first_start(250), 0);
    /// assert_eq!(w.first_start(300), 100);
    /// assert_eq!(WindowSpec::tumbling(60, 0).first_start(59), 0);
    /// ```
    pub fn first_start(&self, t: i64) -> i64 {
        self.start(t) - self.size + self.advance
    }

    /// Starts of every window containing `t`, oldest first.
    pub fn starts(&self, t: i64) -> impl Iterator<Item = i64> {
        let (first, advance) = (self.first_start(t), self.advance);
        (0..self.size / advance).map(move |k| first + k * advance)
    }

    /// The watermark at which the window starting at `start` closes: `end + grace`.
    pub fn closes_at(&self, start: i64) -> i64 {
        start + self.size + self.grace
    }

    /// Whether the window starting at `start` is closed once the watermark is `watermark`.
    ///
    /// ```
    /// # use marquee::window::WindowSpec;
    /// let w = WindowSpec::tumbling(10, 5);
    /// assert!(!w.is_closed(0, 14));
    /// assert!(w.is_closed(0, 15));
    /// ```
    pub fn is_closed(&self, start: i64, watermark: i64) -> bool {
        watermark >= self.closes_at(start)
    }
}

/// Number of group slots: `all` plus one per [`Dimension`].
pub const GROUP_SLOTS: usize = 5;

/// Slot of the group `all`.
pub const ALL: u8 = 0;

/// The stable slot of a dimension (stored in state keys, so never renumber).
pub fn slot(dimension: Dimension) -> u8 {
    match dimension {
        Dimension::Cdn => 1,
        Dimension::Country => 2,
        Dimension::DeviceType => 3,
        Dimension::TitleId => 4,
    }
}

/// The dimension name of a slot, as written in output records.
pub fn slot_name(slot: u8) -> &'static str {
    match slot {
        1 => "cdn",
        2 => "country",
        3 => "device_type",
        4 => "title_id",
        _ => "all",
    }
}

/// The groups an event belongs to: `all` and one value per configured dimension.
pub fn groups<'e>(
    dimensions: &'e [Dimension],
    event: &'e PlaybackEvent,
) -> impl Iterator<Item = (u8, &'e str)> + 'e {
    std::iter::once((ALL, "all")).chain(dimensions.iter().map(move |d| {
        let value = match d {
            Dimension::Cdn => &event.cdn,
            Dimension::Country => &event.country,
            Dimension::DeviceType => &event.device_type,
            Dimension::TitleId => &event.title_id,
        };
        (slot(*d), value.as_str())
    }))
}

/// The groups of a session fact's group values, like [`groups`].
fn fact_groups<'e>(
    dimensions: &'e [Dimension],
    dims: &'e Dims,
) -> impl Iterator<Item = (u8, &'e str)> + 'e {
    std::iter::once((ALL, "all")).chain(dimensions.iter().map(|d| (slot(*d), dims.value(*d))))
}

/// A stable 64-bit hash of a session id (FNV-1a): stored in state, so it must not change
/// between runs or Rust versions. Distinct-session counts are exact up to hash collisions,
/// about one in 10^7 for ten million sessions in one window and group.
pub fn session_hash(session_id: &str) -> u64 {
    crate::session::stable_hash(session_id)
}

/// The QoS aggregate of one window and group.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GroupAgg {
    pub play_ms: i64,
    pub rebuffer_ms: i64,
    pub rebuffer_events: i64,
    /// Hashes of sessions with a PLAY or HEARTBEAT in the window.
    pub viewers: FxHashSet<u64>,
    /// The session lifecycle's contributions.
    pub qoe: Qoe,
    /// What changed since the last checkpoint.
    pub unsaved: GroupDelta,
}

/// The QoE aggregate of one window and group: every part adds or merges, so a checkpoint
/// writes what was added since the last one in this same shape.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Qoe {
    pub attempts: i64,
    pub start_failures: i64,
    pub exits_before_start: i64,
    /// Σ bitrate_kbps × play_ms over played time with a known rendition (exact: i128).
    pub bitrate_kbps_ms: i128,
    /// Σ play_ms of that played time.
    pub bitrate_play_ms: i64,
    /// Startup times of first PLAYs.
    pub startup: Startup,
    /// Anything was added.
    pub changed: bool,
}

impl Qoe {
    /// Adds one decided fact.
    pub fn add(&mut self, fact: Fact) {
        match fact {
            Fact::Attempt => self.attempts += 1,
            Fact::StartFailure => self.start_failures += 1,
            Fact::ExitBeforeStart => self.exits_before_start += 1,
            Fact::Startup(Some(ms)) => self.startup.add(ms as f64),
            Fact::Startup(None) => {}
            Fact::Played {
                play_ms,
                bitrate_kbps,
            } => {
                self.bitrate_kbps_ms += i128::from(bitrate_kbps) * i128::from(play_ms);
                self.bitrate_play_ms += play_ms;
            }
        }
        self.changed = true;
    }

    /// Merges another partial (another partition's, or a stored delta).
    pub fn merge(&mut self, other: &Qoe) {
        self.attempts += other.attempts;
        self.start_failures += other.start_failures;
        self.exits_before_start += other.exits_before_start;
        self.bitrate_kbps_ms += other.bitrate_kbps_ms;
        self.bitrate_play_ms += other.bitrate_play_ms;
        self.startup.merge(&other.startup);
        self.changed |= other.changed;
    }

    /// `Σ(bitrate × play_ms) / Σ play_ms`, or `None` when no played time had a rendition.
    pub fn avg_bitrate_kbps(&self) -> Option<f64> {
        (self.bitrate_play_ms > 0)
            .then(|| self.bitrate_kbps_ms as f64 / self.bitrate_play_ms as f64)
    }
}

/// A DDSketch of startup times (relative error 1%: `Config::defaults()`, whose 2,048 bins
/// cover 1 ms to far beyond a day without collapsing, so merges are exact).
#[derive(Clone, Default)]
pub struct Startup(Option<Box<DDSketch>>);

impl Startup {
    /// The relative accuracy of every quantile.
    pub const RELATIVE_ERROR: f64 = 0.01;

    fn add(&mut self, ms: f64) {
        self.0
            .get_or_insert_with(|| Box::new(DDSketch::new(Config::defaults())))
            .add(ms);
    }

    /// Merges `other` into this sketch.
    pub fn merge(&mut self, other: &Startup) {
        if let Some(o) = &other.0 {
            match &mut self.0 {
                None => self.0 = Some(o.clone()),
                Some(s) => s
                    .merge(o)
                    .expect("every startup sketch has the default config"),
            }
        }
    }

    /// The `q` quantile: the value at rank ⌊q·(n−1)⌋, within 1%; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.0.as_ref().and_then(|s| s.quantile(q).ok().flatten())
    }

    /// Number of startup times.
    pub fn count(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.count())
    }

    /// The stored form (DDSketch's Java-compatible encoding); empty when there is none.
    pub fn encode(&self) -> Vec<u8> {
        self.0.as_ref().map_or_else(Vec::new, |s| s.to_java_bytes())
    }

    /// Reads [`Startup::encode`]'s form; `None` when it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<Startup> {
        if bytes.is_empty() {
            return Some(Startup(None));
        }
        let decoded = DDSketch::from_java_bytes(bytes).ok()?;
        // Re-based on the default config so that it merges with sketches made here.
        let mut sketch = DDSketch::new(Config::defaults());
        sketch.merge(&decoded).ok()?;
        Some(Startup(Some(Box::new(sketch))))
    }
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Startup(n={})", self.count())
    }
}

impl PartialEq for Startup {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

/// What a group gained since the last checkpoint. A checkpoint writes this (a RocksDB merge
/// operand), so its cost follows the change, not the size of the viewer set.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GroupDelta {
    pub play_ms: i64,
    pub rebuffer_ms: i64,
    pub rebuffer_events: i64,
    /// Viewers new to the group.
    pub viewers: Vec<u64>,
    /// Any event was added.
    pub changed: bool,
    /// Session facts added (its own `changed` says whether there were any).
    pub qoe: Qoe,
}

impl GroupAgg {
    /// Adds one event of session `session` (its [`session_hash`]).
    pub fn add(&mut self, event: &PlaybackEvent, session: u64) {
        let delta = &mut self.unsaved;
        self.play_ms += event.play_ms;
        self.rebuffer_ms += event.rebuffer_ms;
        delta.play_ms += event.play_ms;
        delta.rebuffer_ms += event.rebuffer_ms;
        match event.event_type {
            EventType::RebufferStart => {
                self.rebuffer_events += 1;
                delta.rebuffer_events += 1;
            }
            EventType::Play | EventType::Heartbeat if self.viewers.insert(session) => {
                delta.viewers.push(session);
            }
            _ => {}
        }
        delta.changed = true;
    }

    /// Adds one decided session fact.
    pub fn add_fact(&mut self, fact: Fact) {
        self.qoe.add(fact);
        self.unsaved.qoe.add(fact);
    }

    /// Merges the partial of another partition into this one.
    pub fn merge(&mut self, other: &GroupAgg) {
        self.play_ms += other.play_ms;
        self.rebuffer_ms += other.rebuffer_ms;
        self.rebuffer_events += other.rebuffer_events;
        self.viewers.extend(&other.viewers);
        self.qoe.merge(&other.qoe);
    }
}

/// Every group's aggregate of one window, indexed by slot then group value.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WindowPartial {
    pub groups: [FxHashMap<Box<str>, GroupAgg>; GROUP_SLOTS],
}

impl WindowPartial {
    /// The aggregate of `(slot, value)`, created empty on first use.
    pub fn group_mut(&mut self, slot: u8, value: &str) -> &mut GroupAgg {
        let map = &mut self.groups[slot as usize];
        if !map.contains_key(value) {
            map.insert(value.into(), GroupAgg::default());
        }
        map.get_mut(value).expect("inserted above")
    }

    /// Merges another partition's partial of the same window.
    pub fn merge(&mut self, other: &WindowPartial) {
        for (slot, map) in other.groups.iter().enumerate() {
            for (value, agg) in map {
                self.group_mut(slot as u8, value).merge(agg);
            }
        }
    }

    /// Number of groups with data.
    pub fn len(&self) -> usize {
        self.groups.iter().map(FxHashMap::len).sum()
    }

    /// Whether no group has data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The results of this window (final, or early while it is open), ordered by dimension
    /// slot then value; the QoE fields are set when `qoe` is on.
    pub fn results(
        &self,
        spec: &WindowSpec,
        start: i64,
        is_final: bool,
        qoe: bool,
    ) -> Vec<QosWindow> {
        let mut out = Vec::with_capacity(self.len());
        for (slot, map) in self.groups.iter().enumerate() {
            let mut values: Vec<_> = map.iter().collect();
            values.sort_by(|a, b| a.0.cmp(b.0));
            for (value, agg) in values {
                let q = &agg.qoe;
                let count = |n: i64| qoe.then_some(n);
                out.push(QosWindow {
                    window_start: start,
                    window_end: start + spec.size,
                    dimension: slot_name(slot as u8).to_string(),
                    value: value.to_string(),
                    concurrent_viewers: agg.viewers.len() as i64,
                    play_ms: agg.play_ms,
                    rebuffer_ms: agg.rebuffer_ms,
                    rebuffer_events: agg.rebuffer_events,
                    rebuffer_ratio: rebuffer_ratio(agg.play_ms, agg.rebuffer_ms),
                    is_final,
                    attempts: count(q.attempts),
                    video_start_failures: count(q.start_failures),
                    exits_before_video_start: count(q.exits_before_start),
                    startup_ms_p50: q.startup.quantile(0.5),
                    startup_ms_p90: q.startup.quantile(0.9),
                    startup_ms_p99: q.startup.quantile(0.99),
                    avg_bitrate_kbps: q.avg_bitrate_kbps(),
                });
            }
        }
        out
    }
}

/// The open windows of one input partition, by window start.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PartitionWindows {
    pub windows: BTreeMap<i64, WindowPartial>,
}

impl PartitionWindows {
    /// Adds an on-time event to each of its windows.
    pub fn add(&mut self, spec: &WindowSpec, dimensions: &[Dimension], event: &PlaybackEvent) {
        let session = session_hash(&event.session_id);
        for start in spec.starts(event.event_time) {
            let window = self.windows.entry(start).or_default();
            for (slot, value) in groups(dimensions, event) {
                window.group_mut(slot, value).add(event, session);
            }
        }
    }

    /// Adds a decided session fact at event time `time` to each of its windows still open
    /// at `closed_through` (all of them, since facts are decided before their windows close).
    pub fn add_fact(
        &mut self,
        spec: &WindowSpec,
        dimensions: &[Dimension],
        closed_through: i64,
        (time, dims, fact): (i64, &Dims, Fact),
    ) {
        for start in spec.starts(time) {
            if spec.is_closed(start, closed_through) {
                continue;
            }
            let window = self.windows.entry(start).or_default();
            for (slot, value) in fact_groups(dimensions, dims) {
                window.group_mut(slot, value).add_fact(fact);
            }
        }
    }

    /// Removes and returns the windows closed at `watermark`, oldest first.
    pub fn take_closed(&mut self, spec: &WindowSpec, watermark: i64) -> Vec<(i64, WindowPartial)> {
        let mut closed = Vec::new();
        while let Some(entry) = self.windows.first_entry() {
            if !spec.is_closed(*entry.key(), watermark) {
                break;
            }
            closed.push(entry.remove_entry());
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(session: &str, t: i64, kind: EventType, play: i64, rebuffer: i64) -> PlaybackEvent {
        PlaybackEvent {
            event_id: format!("{session}-{t}"),
            session_id: session.into(),
            account_id: "a".into(),
            profile_id: "p".into(),
            device_id: "d".into(),
            device_type: "tv".into(),
            title_id: "t".into(),
            country: "NL".into(),
            cdn: if session.len() % 2 == 0 {
                "akamai"
            } else {
                "fastly"
            }
            .into(),
            event_type: kind,
            event_time: t,
            position_ms: 0,
            duration_ms: None,
            play_ms: play,
            rebuffer_ms: rebuffer,
            startup_ms: None,
            bitrate_kbps: None,
            error_code: None,
        }
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let spec = WindowSpec::tumbling(60_000, 0);
        let dims = [Dimension::Cdn];
        let mut p = PartitionWindows::default();
        for e in [
            event("s1", 1_000, EventType::Play, 0, 0),
            event("s1", 2_000, EventType::Heartbeat, 1_000, 0),
            event("s22", 3_000, EventType::RebufferStart, 500, 0),
            event("s22", 4_000, EventType::RebufferEnd, 0, 500),
            event("s333", 61_000, EventType::Heartbeat, 10, 0),
        ] {
            p.add(&spec, &dims, &e);
        }
        let closed = p.take_closed(&spec, 60_000);
        assert_eq!(closed.len(), 1);
        let results = closed[0].1.results(&spec, 0, true, false);
        let all = &results[0];
        assert_eq!((all.dimension.as_str(), all.value.as_str()), ("all", "all"));
        assert_eq!(all.concurrent_viewers, 1, "only s1 had PLAY or HEARTBEAT");
        assert_eq!(
            (all.play_ms, all.rebuffer_ms, all.rebuffer_events),
            (1_500, 500, 1)
        );
        assert_eq!(all.rebuffer_ratio, Some(0.25));
        assert_eq!(results.len(), 3, "all, cdn=akamai, cdn=fastly");
        assert_eq!(p.windows.len(), 1, "the next window stays open");
    }

    #[test]
    fn nothing_played_has_no_ratio() {
        assert_eq!(rebuffer_ratio(0, 0), None);
    }

    proptest! {
        /// Any split of events over partitions merges to the single-partition result.
        #[test]
        fn partials_merge_like_one_partition(
            events in prop::collection::vec((0u8..6, 0i64..200_000, 0u8..4, 0i64..5_000, 0i64..500, 0usize..3), 1..120)
        ) {
            let spec = WindowSpec::tumbling(30_000, 5_000);
            let dims = [Dimension::Cdn, Dimension::Country];
            let kinds = [EventType::Play, EventType::Heartbeat, EventType::RebufferStart, EventType::End];
            let mut single = PartitionWindows::default();
            let mut split = [PartitionWindows::default(), PartitionWindows::default(), PartitionWindows::default()];
            for (s, t, k, play, rebuf, part) in events {
                let e = event(&format!("s{s}"), t, kinds[k as usize], play, rebuf);
                single.add(&spec, &dims, &e);
                split[part].add(&spec, &dims, &e);
            }
            let watermark = i64::MAX;
            let mut merged: BTreeMap<i64, WindowPartial> = BTreeMap::new();
            for p in &mut split {
                for (start, partial) in p.take_closed(&spec, watermark) {
                    merged.entry(start).or_default().merge(&partial);
                }
            }
            let expected: Vec<_> = single.take_closed(&spec, watermark).into_iter().flat_map(|(s, w)| w.results(&spec, s, true, false)).collect();
            let actual: Vec<_> = merged.iter().flat_map(|(s, w)| w.results(&spec, *s, true, false)).collect();
            prop_assert_eq!(expected, actual);
        }

        /// A hopping window equals the union of the tumbling windows of its advance that it
        /// covers (sums add, viewer sets join), and every time is in exactly `size / advance`
        /// windows.
        #[test]
        fn hopping_windows_are_unions_of_the_tumbling_ones_they_cover(
            events in prop::collection::vec((0u8..6, 0i64..200_000, 0u8..4, 0i64..5_000, 0i64..500), 1..120),
            steps in 1i64..6,
        ) {
            let advance = 10_000;
            let hopping = WindowSpec { size: advance * steps, advance, grace: 0 };
            let tumbling = WindowSpec::tumbling(advance, 0);
            let dims = [Dimension::Cdn, Dimension::Country];
            let kinds = [EventType::Play, EventType::Heartbeat, EventType::RebufferStart, EventType::End];
            let (mut hop, mut tumble) = (PartitionWindows::default(), PartitionWindows::default());
            for (s, t, k, play, rebuf) in events {
                let e = event(&format!("s{s}"), t, kinds[k as usize], play, rebuf);
                hop.add(&hopping, &dims, &e);
                tumble.add(&tumbling, &dims, &e);
                let starts: Vec<i64> = hopping.starts(t).collect();
                prop_assert_eq!(starts.len() as i64, steps);
                prop_assert!(starts.iter().all(|s| *s <= t && t < s + hopping.size));
            }
            for (start, window) in &hop.windows {
                let mut union = WindowPartial::default();
                for covered in (0..steps).map(|k| start + k * advance) {
                    if let Some(w) = tumble.windows.get(&covered) {
                        union.merge(w);
                    }
                }
                prop_assert_eq!(window.results(&hopping, *start, true, false), union.results(&hopping, *start, true, false));
            }
        }

        /// Startup sketches of any split of the values merge to the sketch of all of them,
        /// and every quantile is within 1% of the value at rank ⌊q·(n−1)⌋.
        #[test]
        fn startup_sketches_merge_exactly_and_stay_within_one_percent(
            values in prop::collection::vec((1i64..600_000, 0usize..3), 1..300),
        ) {
            let mut whole = Qoe::default();
            let mut parts = [Qoe::default(), Qoe::default(), Qoe::default()];
            for (v, part) in &values {
                whole.add(Fact::Startup(Some(*v)));
                parts[*part].add(Fact::Startup(Some(*v)));
            }
            let mut merged = Qoe::default();
            for p in &parts {
                // Through the stored form, as partitions' deltas are.
                merged.merge(&Qoe { startup: Startup::decode(&p.startup.encode()).unwrap(), ..p.clone() });
            }
            prop_assert_eq!(&merged.startup, &whole.startup);
            let mut sorted: Vec<i64> = values.iter().map(|(v, _)| *v).collect();
            sorted.sort();
            for q in [0.5, 0.9, 0.99] {
                let exact = sorted[(q * (sorted.len() - 1) as f64) as usize] as f64;
                let estimate = merged.startup.quantile(q).unwrap();
                prop_assert!((estimate - exact).abs() <= Startup::RELATIVE_ERROR * exact,
                    "q={} estimate {} exact {}", q, estimate, exact);
            }
        }

        #[test]
        fn every_time_falls_in_exactly_its_window(t in -10_000_000_000i64..10_000_000_000, size in 1i64..86_400_000) {
            let spec = WindowSpec::tumbling(size, 0);
            let start = spec.start(t);
            prop_assert!(start <= t && t < start + size);
            prop_assert_eq!(start.rem_euclid(size), 0);
        }
    }
}
