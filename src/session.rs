//! The session lifecycle rule: what one playback session contributes to the QoE fields of
//! its windows (attempts, start failures, exits before start, startup time, bitrate).
//!
//! Every fact depends on the order of the session's events *by event time* (ties broken by a
//! stable hash of `event_id`), never on arrival order, so it is decided only once nothing
//! earlier can still arrive: when the operator watermark closes the oldest window containing
//! the fact's time (see [`Session::decide`]). A session lives in one input partition, so its
//! state is keyed by partition and `session_id`; it is forgotten once it has had no event for
//! the inactivity timeout, and an event after such a gap starts a new session.

use crate::check::{MAX_EVENT_TIME, MIN_EVENT_TIME};
use crate::config::Dimension;
use crate::record::{EventType, PlaybackEvent};

/// Where an event sits in its session's event-time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub time: i64,
    /// Stable hash of the event id: breaks ties between events of the same millisecond.
    pub tie: u64,
}

impl Mark {
    /// The mark of `event`.
    pub fn of(event: &PlaybackEvent) -> Self {
        Self {
            time: event.event_time,
            tie: stable_hash(&event.event_id),
        }
    }
}

/// The group values of the event a fact comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dims {
    pub cdn: Box<str>,
    pub country: Box<str>,
    pub device_type: Box<str>,
    pub title_id: Box<str>,
}

impl Dims {
    /// The value of `dimension`.
    pub fn value(&self, dimension: Dimension) -> &str {
        match dimension {
            Dimension::Cdn => &self.cdn,
            Dimension::Country => &self.country,
            Dimension::DeviceType => &self.device_type,
            Dimension::TitleId => &self.title_id,
        }
    }

    fn matches(&self, e: &PlaybackEvent) -> bool {
        *self.cdn == *e.cdn
            && *self.country == *e.country
            && *self.device_type == *e.device_type
            && *self.title_id == *e.title_id
    }

    fn of(e: &PlaybackEvent) -> Self {
        Self {
            cdn: e.cdn.as_str().into(),
            country: e.country.as_str().into(),
            device_type: e.device_type.as_str().into(),
            title_id: e.title_id.as_str().into(),
        }
    }
}

/// A decided contribution of one session to the windows containing its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// The session's START falls here.
    Attempt,
    /// Its first ERROR came before any PLAY.
    StartFailure,
    /// Its first END came before any PLAY and any ERROR.
    ExitBeforeStart,
    /// Its first PLAY, with that PLAY's `startup_ms`.
    Startup(Option<i64>),
    /// `play_ms` played at `bitrate_kbps`, the rendition current at that event.
    Played { play_ms: i64, bitrate_kbps: i32 },
}

/// The earliest event of one kind and whether it has been decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct First {
    mark: Mark,
    dims: u16,
    /// `startup_ms`, for the first PLAY.
    startup_ms: Option<i64>,
    decided: bool,
}

/// Played time waiting for its rendition to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    mark: Mark,
    play_ms: i64,
    dims: u16,
}

/// The state of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Newest event time seen: the inactivity timeout runs from it.
    pub last_time: i64,
    /// Group values referenced by undecided items.
    dims: Vec<Dims>,
    start: Option<First>,
    play: Option<First>,
    error: Option<First>,
    end: Option<First>,
    /// PLAY and BITRATE_CHANGE events with a bitrate, by mark; only the newest decided one
    /// is kept.
    renditions: Vec<(Mark, i32)>,
    pieces: Vec<Piece>,
}

impl Session {
    /// Adds an on-time event. When it comes more than `timeout` after the newest event seen,
    /// the session has ended: its remaining facts are decided (nothing earlier can still
    /// arrive, see [`check_timeout`]) and passed to `emit`, and a new session begins.
    pub fn observe(
        &mut self,
        event: &PlaybackEvent,
        timeout: i64,
        emit: &mut impl FnMut(i64, &Dims, Fact),
    ) {
        if !self.is_new() && event.event_time > self.last_time.saturating_add(timeout) {
            self.decide(i64::MAX, 1, emit);
            *self = Session::default();
        }
        if self.is_new() {
            self.last_time = event.event_time;
        }
        self.last_time = self.last_time.max(event.event_time);
        let mark = Mark::of(event);
        let kind = event.event_type;
        let tracked = matches!(
            kind,
            EventType::Start | EventType::Play | EventType::Error | EventType::End
        );
        if !tracked && event.play_ms <= 0 {
            if let (EventType::BitrateChange, Some(kbps)) = (kind, event.bitrate_kbps) {
                self.add_rendition(mark, kbps);
            }
            return;
        }
        let Some(dims) = self.dims_index(event) else {
            return;
        };
        let candidate = First {
            mark,
            dims,
            startup_ms: event.startup_ms,
            decided: false,
        };
        let slot = match kind {
            EventType::Start => Some(&mut self.start),
            EventType::Play => Some(&mut self.play),
            EventType::Error => Some(&mut self.error),
            EventType::End => Some(&mut self.end),
            _ => None,
        };
        if let Some(slot) = slot {
            match slot {
                Some(first) if first.mark <= mark || first.decided => {}
                _ => *slot = Some(candidate),
            }
        }
        if let (EventType::Play | EventType::BitrateChange, Some(kbps)) = (kind, event.bitrate_kbps)
        {
            self.add_rendition(mark, kbps);
        }
        if event.play_ms > 0 {
            self.pieces.push(Piece {
                mark,
                play_ms: event.play_ms,
                dims,
            });
        }
    }

    fn is_new(&self) -> bool {
        *self == Session::default()
    }

    fn add_rendition(&mut self, mark: Mark, kbps: i32) {
        let at = self.renditions.partition_point(|(m, _)| *m <= mark);
        self.renditions.insert(at, (mark, kbps));
    }

    /// The index of `event`'s group values, or `None` when a hostile session keeps more
    /// distinct ones pending than an index can name.
    fn dims_index(&mut self, event: &PlaybackEvent) -> Option<u16> {
        if let Some(i) = self.dims.iter().position(|d| d.matches(event)) {
            return Some(i as u16);
        }
        if self.dims.len() >= usize::from(u16::MAX) {
            self.compact_dims();
            if self.dims.len() >= usize::from(u16::MAX) {
                return None;
            }
        }
        self.dims.push(Dims::of(event));
        Some((self.dims.len() - 1) as u16)
    }

    /// Decides every fact whose time is before `horizon` (all of the session's events before
    /// it have arrived: later ones would be late), passing each to `emit` once. Played time
    /// of consecutive events in the same `slice` of event time (the window advance: the same
    /// windows), group values and rendition is passed as one fact.
    pub fn decide(&mut self, horizon: i64, slice: i64, emit: &mut impl FnMut(i64, &Dims, Fact)) {
        // "Before" compares event times: an ERROR at the same millisecond as the first PLAY
        // is not before it, nor is an ERROR at the same millisecond as an END.
        let play = self.play.map(|p| p.mark.time);
        let error = self.error.map(|e| e.mark.time);
        let after = |first: Option<i64>, t: i64| first.is_none_or(|f| f > t);
        let dims = &self.dims;
        let mut settle = |slot: &mut Option<First>, fact: &dyn Fn(&First) -> Option<Fact>| {
            if let Some(first) = slot
                .as_mut()
                .filter(|f| !f.decided && f.mark.time < horizon)
            {
                first.decided = true;
                if let Some(fact) = fact(first) {
                    emit(first.mark.time, &dims[usize::from(first.dims)], fact);
                }
            }
        };
        settle(&mut self.start, &|_| Some(Fact::Attempt));
        settle(&mut self.error, &|e| {
            after(play, e.mark.time).then_some(Fact::StartFailure)
        });
        settle(&mut self.end, &|e| {
            let t = e.mark.time;
            (after(play, t) && error.is_none_or(|x| x >= t)).then_some(Fact::ExitBeforeStart)
        });
        settle(&mut self.play, &|p| Some(Fact::Startup(p.startup_ms)));
        let renditions = &self.renditions;
        // (time, slice, dims, bitrate, play_ms) of played time not yet passed on.
        let mut run: Option<(i64, i64, u16, i32, i64)> = None;
        let mut flush = |run: Option<(i64, i64, u16, i32, i64)>| {
            if let Some((t, _, d, bitrate_kbps, play_ms)) = run {
                let fact = Fact::Played {
                    play_ms,
                    bitrate_kbps,
                };
                emit(t, &dims[usize::from(d)], fact);
            }
        };
        self.pieces.retain(|piece| {
            if piece.mark.time >= horizon {
                return true;
            }
            // At or before it by event time: a rendition of the same millisecond counts.
            let current = renditions.partition_point(|(m, _)| m.time <= piece.mark.time);
            if let Some(&(_, kbps)) = current.checked_sub(1).map(|i| &renditions[i]) {
                let at = piece.mark.time.div_euclid(slice);
                match &mut run {
                    Some((_, s, d, b, ms)) if *s == at && *d == piece.dims && *b == kbps => {
                        *ms += piece.play_ms;
                    }
                    _ => flush(run.replace((piece.mark.time, at, piece.dims, kbps, piece.play_ms))),
                }
            }
            false
        });
        flush(run);
        // Of the renditions before the horizon only the newest can still be current.
        let decided = self.renditions.partition_point(|(m, _)| m.time < horizon);
        if decided > 1 {
            self.renditions.drain(..decided - 1);
        }
        self.compact_dims();
    }

    /// Whether every fact is decided.
    pub fn settled(&self) -> bool {
        self.pieces.is_empty()
            && [self.start, self.play, self.error, self.end]
                .iter()
                .all(|f| f.is_none_or(|f| f.decided))
    }

    /// Drops group values no undecided item refers to.
    fn compact_dims(&mut self) {
        let mut used = vec![None; self.dims.len()];
        let mut kept = Vec::new();
        let mut remap = |i: &mut u16, dims: &mut Vec<Dims>| {
            let slot = &mut used[usize::from(*i)];
            let new = *slot.get_or_insert_with(|| {
                kept.push(std::mem::take(&mut dims[usize::from(*i)]));
                (kept.len() - 1) as u16
            });
            *i = new;
        };
        for first in [
            &mut self.start,
            &mut self.play,
            &mut self.error,
            &mut self.end,
        ] {
            if let Some(f) = first.as_mut().filter(|f| !f.decided) {
                remap(&mut f.dims, &mut self.dims);
            }
        }
        for piece in &mut self.pieces {
            remap(&mut piece.dims, &mut self.dims);
        }
        self.dims = kept;
    }

    /// The stored form (see [`Session::decode`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(VERSION);
        put_i64(out, self.last_time);
        out.extend_from_slice(&(self.dims.len() as u16).to_le_bytes());
        for d in &self.dims {
            for s in [&d.cdn, &d.country, &d.device_type, &d.title_id] {
                out.extend_from_slice(&(s.len() as u16).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        for first in [self.start, self.play, self.error, self.end] {
            match first {
                None => out.push(0),
                Some(f) => {
                    out.push(
                        1 | (u8::from(f.decided) << 1) | (u8::from(f.startup_ms.is_some()) << 2),
                    );
                    put_mark(out, f.mark);
                    out.extend_from_slice(&f.dims.to_le_bytes());
                    put_i64(out, f.startup_ms.unwrap_or(0));
                }
            }
        }
        out.extend_from_slice(&(self.renditions.len() as u32).to_le_bytes());
        for (mark, kbps) in &self.renditions {
            put_mark(out, *mark);
            out.extend_from_slice(&kbps.to_le_bytes());
        }
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for p in &self.pieces {
            put_mark(out, p.mark);
            put_i64(out, p.play_ms);
            out.extend_from_slice(&p.dims.to_le_bytes());
        }
    }

    /// Reads [`Session::encode`]'s form; `None` when it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<Session> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let last_time = r.i64()?;
        let mut dims = Vec::new();
        for _ in 0..r.u16()? {
            let mut part = || -> Option<Box<str>> {
                let len = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
                Some(std::str::from_utf8(r.take(usize::from(len))?).ok()?.into())
            };
            dims.push(Dims {
                cdn: part()?,
                country: part()?,
                device_type: part()?,
                title_id: part()?,
            });
        }
        let n = dims.len();
        let mut firsts = [None; 4];
        for first in &mut firsts {
            let flags = r.u8()?;
            if flags & 1 == 1 {
                let (mark, d, startup) = (r.mark()?, r.u16()?, r.i64()?);
                *first = Some(First {
                    mark,
                    dims: d,
                    startup_ms: (flags & 4 != 0).then_some(startup),
                    decided: flags & 2 != 0,
                });
            }
        }
        let mut renditions = Vec::new();
        for _ in 0..r.u32()? {
            renditions.push((r.mark()?, r.i64_of(4)? as i32));
        }
        let mut pieces = Vec::new();
        for _ in 0..r.u32()? {
            let (mark, play_ms, d) = (r.mark()?, r.i64()?, r.u16()?);
            pieces.push(Piece {
                mark,
                play_ms,
                dims: d,
            });
        }
        let valid = |d: u16| usize::from(d) < n;
        // Only accepted events are stored: their times pass the bad-data rules.
        let time = |t: i64| (MIN_EVENT_TIME..MAX_EVENT_TIME).contains(&t);
        let firsts_ok = firsts
            .iter()
            .flatten()
            .all(|f| time(f.mark.time) && (f.decided || valid(f.dims)));
        let pieces_ok = pieces.iter().all(|p| time(p.mark.time) && valid(p.dims));
        let renditions_ok = renditions.iter().all(|(m, _)| time(m.time));
        if !r.0.is_empty() || !time(last_time) || !firsts_ok || !pieces_ok || !renditions_ok {
            return None;
        }
        let [start, play, error, end] = firsts;
        Some(Session {
            last_time,
            dims,
            start,
            play,
            error,
            end,
            renditions,
            pieces,
        })
    }
}

/// The rule that makes [`Session::observe`]'s restart after a gap safe: once an event more
/// than `timeout` after the session's newest one is on time, every earlier window of the
/// session must be closed by its partition's watermark. An error names what to raise.
pub fn check_timeout(
    timeout: i64,
    out_of_orderness: i64,
    window: i64,
    grace: i64,
) -> Result<(), String> {
    let needed = out_of_orderness + window + grace;
    if timeout >= needed {
        Ok(())
    } else {
        Err(format!(
            "expected at least `time.out_of_orderness` + `qos.window` + `qos.grace` = {needed}ms, \
             so that nothing of a session can still arrive when its next one begins"
        ))
    }
}

/// A stable 64-bit hash (FNV-1a): stored in state, so it must not change between runs or
/// Rust versions.
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const VERSION: u8 = 1;

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_mark(out: &mut Vec<u8>, m: Mark) {
    put_i64(out, m.time);
    out.extend_from_slice(&m.tie.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        self.i64_of(8)
    }
    fn i64_of(&mut self, n: usize) -> Option<i64> {
        let bytes = self.take(n)?;
        Some(match n {
            4 => i64::from(i32::from_le_bytes(bytes.try_into().ok()?)),
            _ => i64::from_le_bytes(bytes.try_into().ok()?),
        })
    }
    fn mark(&mut self) -> Option<Mark> {
        Some(Mark {
            time: self.i64()?,
            tie: u64::from_le_bytes(self.take(8)?.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3_600_000;
    /// Event times are this plus the tests' times (2026-01-01: within the bad-data rules).
    const BASE: i64 = 1_767_225_600_000;
    /// The window advance the tests decide with: played time is summed per slice of it.
    const SLICE: i64 = 10_000;

    /// Facts in a canonical order, played time summed per slice and bitrate (what windows
    /// see: every time in a slice is in the same windows).
    fn normalize(facts: Vec<(i64, Fact)>) -> Vec<(i64, Fact)> {
        let mut played: std::collections::BTreeMap<(i64, i32), i64> = Default::default();
        let mut out: Vec<(i64, Fact)> = Vec::new();
        for (t, f) in facts {
            match f {
                Fact::Played {
                    play_ms,
                    bitrate_kbps,
                } => {
                    *played
                        .entry((t.div_euclid(SLICE) * SLICE - BASE, bitrate_kbps))
                        .or_default() += play_ms;
                }
                other => out.push((t - BASE, other)),
            }
        }
        out.extend(played.into_iter().map(|((t, bitrate_kbps), play_ms)| {
            (
                t,
                Fact::Played {
                    play_ms,
                    bitrate_kbps,
                },
            )
        }));
        out.sort_by_key(|(t, f)| (*t, format!("{f:?}")));
        out
    }

    fn ev(id: u32, t: i64, kind: EventType) -> PlaybackEvent {
        PlaybackEvent {
            event_id: format!("e{id}"),
            session_id: "s".into(),
            account_id: "a".into(),
            profile_id: "p".into(),
            device_id: "d".into(),
            device_type: "tv".into(),
            title_id: "t".into(),
            country: "NL".into(),
            cdn: "akamai".into(),
            event_type: kind,
            event_time: BASE + t,
            position_ms: 0,
            duration_ms: None,
            play_ms: 0,
            rebuffer_ms: 0,
            startup_ms: None,
            bitrate_kbps: None,
            error_code: None,
        }
    }

    fn with(
        mut e: PlaybackEvent,
        play_ms: i64,
        bitrate: Option<i32>,
        startup: Option<i64>,
    ) -> PlaybackEvent {
        e.play_ms = play_ms;
        e.bitrate_kbps = bitrate;
        e.startup_ms = startup;
        e
    }

    /// Facts of `arrivals` observed in that order, deciding at every horizon in `horizons`
    /// (each after the arrivals before its index), then at the end.
    fn run(arrivals: &[PlaybackEvent], horizons: &[(usize, i64)]) -> Vec<(i64, Fact)> {
        let mut session = Session::default();
        let mut facts = Vec::new();
        let mut emit = |t: i64, _: &Dims, f: Fact| facts.push((t, f));
        for (i, e) in arrivals.iter().enumerate() {
            for (_, h) in horizons.iter().filter(|(at, _)| *at == i) {
                session.decide(*h, SLICE, &mut emit);
            }
            session.observe(e, HOUR, &mut emit);
        }
        session.decide(i64::MAX, SLICE, &mut emit);
        assert!(session.settled());
        normalize(facts)
    }

    /// The definitions, applied to the whole session sorted by event time.
    fn reference(events: &[PlaybackEvent]) -> Vec<(i64, Fact)> {
        let mut sorted: Vec<_> = events.to_vec();
        sorted.sort_by_key(Mark::of);
        let first = |k: EventType| sorted.iter().find(|e| e.event_type == k);
        let times = |k: EventType| {
            sorted
                .iter()
                .filter(move |e| e.event_type == k)
                .map(|e| e.event_time)
        };
        let mut facts = Vec::new();
        if let Some(s) = first(EventType::Start) {
            facts.push((s.event_time, Fact::Attempt));
        }
        // DESIGN.md: an ERROR before any PLAY; an END before any PLAY, with no ERROR before it.
        if let Some(e) =
            first(EventType::Error).filter(|e| times(EventType::Play).all(|p| e.event_time < p))
        {
            facts.push((e.event_time, Fact::StartFailure));
        }
        if let Some(e) = first(EventType::End).filter(|e| {
            times(EventType::Play).all(|p| e.event_time < p)
                && !times(EventType::Error).any(|x| x < e.event_time)
        }) {
            facts.push((e.event_time, Fact::ExitBeforeStart));
        }
        if let Some(p) = first(EventType::Play) {
            facts.push((p.event_time, Fact::Startup(p.startup_ms)));
        }
        for e in &sorted {
            // The newest PLAY or BITRATE_CHANGE with a bitrate at or before it by event time.
            let rendition = sorted
                .iter()
                .filter(|r| matches!(r.event_type, EventType::Play | EventType::BitrateChange))
                .filter(|r| r.bitrate_kbps.is_some() && r.event_time <= e.event_time)
                .max_by_key(|r| Mark::of(r))
                .and_then(|r| r.bitrate_kbps);
            if let (true, Some(bitrate_kbps)) = (e.play_ms > 0, rendition) {
                facts.push((
                    e.event_time,
                    Fact::Played {
                        play_ms: e.play_ms,
                        bitrate_kbps,
                    },
                ));
            }
        }
        normalize(facts)
    }

    #[test]
    fn a_start_failure_is_an_error_before_any_play_by_event_time() {
        let error = ev(1, 2_000, EventType::Error);
        let play = with(ev(2, 1_000, EventType::Play), 0, None, Some(800));
        // The PLAY arrives after the ERROR but happened before it: no start failure.
        let facts = run(&[ev(0, 0, EventType::Start), error.clone(), play], &[]);
        assert_eq!(
            facts,
            vec![(0, Fact::Attempt), (1_000, Fact::Startup(Some(800)))]
        );
        let late_play = with(ev(2, 3_000, EventType::Play), 0, None, Some(800));
        let facts = run(&[error, late_play, ev(3, 4_000, EventType::End)], &[]);
        assert_eq!(
            facts,
            vec![
                (2_000, Fact::StartFailure),
                (3_000, Fact::Startup(Some(800)))
            ],
            "an END after an ERROR is not an exit before start"
        );
    }

    #[test]
    fn events_of_the_same_millisecond_are_not_before_each_other() {
        let play = with(ev(1, 1_000, EventType::Play), 0, Some(3_000), Some(400));
        let facts = run(&[ev(0, 1_000, EventType::Error), play.clone()], &[]);
        assert_eq!(
            facts,
            vec![(1_000, Fact::Startup(Some(400)))],
            "an ERROR with the first PLAY is no start failure"
        );
        let facts = run(
            &[ev(2, 1_000, EventType::End), ev(3, 1_000, EventType::Error)],
            &[],
        );
        assert_eq!(
            facts,
            vec![(1_000, Fact::ExitBeforeStart), (1_000, Fact::StartFailure)],
            "an ERROR of the same millisecond is not before the END"
        );
        let beat = with(ev(4, 1_000, EventType::Heartbeat), 700, None, None);
        let switch = with(ev(5, 1_000, EventType::BitrateChange), 0, Some(6_000), None);
        let played: Vec<_> = run(
            &[
                with(ev(6, 0, EventType::Play), 0, Some(3_000), None),
                beat,
                switch,
            ],
            &[],
        )
        .into_iter()
        .filter(|(_, f)| matches!(f, Fact::Played { .. }))
        .collect();
        assert_eq!(
            played,
            vec![(
                0,
                Fact::Played {
                    play_ms: 700,
                    bitrate_kbps: 6_000
                }
            )],
            "a rendition at the same millisecond is at or before the event"
        );
    }

    #[test]
    fn an_exit_before_start_is_an_end_before_any_play_or_error() {
        let facts = run(
            &[
                ev(0, 0, EventType::Start),
                ev(1, 5_000, EventType::End),
                ev(2, 6_000, EventType::End),
            ],
            &[],
        );
        assert_eq!(
            facts,
            vec![(0, Fact::Attempt), (5_000, Fact::ExitBeforeStart)]
        );
    }

    #[test]
    fn played_time_counts_at_the_rendition_current_by_event_time() {
        let events = [
            with(ev(0, 0, EventType::Play), 0, Some(3_000), Some(500)),
            with(ev(1, 10_000, EventType::Heartbeat), 10_000, None, None),
            // Arrives last but happened before the second heartbeat.
            with(ev(3, 20_000, EventType::Heartbeat), 5_000, None, None),
            with(
                ev(2, 15_000, EventType::BitrateChange),
                0,
                Some(6_000),
                None,
            ),
        ];
        let played: Vec<_> = run(&events, &[])
            .into_iter()
            .filter(|(_, f)| matches!(f, Fact::Played { .. }))
            .collect();
        assert_eq!(
            played,
            vec![
                (
                    10_000,
                    Fact::Played {
                        play_ms: 10_000,
                        bitrate_kbps: 3_000
                    }
                ),
                (
                    20_000,
                    Fact::Played {
                        play_ms: 5_000,
                        bitrate_kbps: 6_000
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_event_after_the_timeout_begins_a_new_session() {
        let facts = run(
            &[
                ev(0, 0, EventType::Start),
                ev(1, 1_000, EventType::End),
                ev(2, 2 * HOUR, EventType::Start),
                with(ev(3, 2 * HOUR + 1, EventType::Play), 0, None, Some(90)),
            ],
            &[],
        );
        assert_eq!(
            facts,
            vec![
                (0, Fact::Attempt),
                (1_000, Fact::ExitBeforeStart),
                (2 * HOUR, Fact::Attempt),
                (2 * HOUR + 1, Fact::Startup(Some(90))),
            ]
        );
    }

    #[test]
    fn malformed_state_is_refused_not_guessed() {
        assert_eq!(Session::decode(&[]), None);
        assert_eq!(Session::decode(&[9]), None);
        let mut s = Session::default();
        s.observe(&ev(0, 0, EventType::Start), HOUR, &mut |_, _, _| {});
        let mut bytes = Vec::new();
        s.encode(&mut bytes);
        assert_eq!(Session::decode(&bytes[..bytes.len() - 1]), None);
        // A time no accepted event can have (found by the `session` fuzz target: a fact at
        // i64::MAX could never be decided).
        let mut impossible = bytes.clone();
        impossible[1..9].copy_from_slice(&i64::MAX.to_le_bytes());
        assert_eq!(Session::decode(&impossible), None);
        bytes.push(0);
        assert_eq!(Session::decode(&bytes), None);
    }

    fn arb_event() -> impl Strategy<Value = PlaybackEvent> {
        let kinds = [
            EventType::Start,
            EventType::Play,
            EventType::Heartbeat,
            EventType::BitrateChange,
            EventType::Error,
            EventType::End,
            EventType::Pause,
        ];
        (
            0usize..kinds.len(),
            (0i64..60).prop_map(|s| s * 1_000), // many events share a millisecond
            0i64..5_000,
            prop::option::of(1i32..10_000),
            prop::option::of(0i64..20_000),
            any::<u32>(),
        )
            .prop_map(move |(k, t, play, bitrate, startup, id)| {
                with(ev(id, t, kinds[k]), play, bitrate, startup)
            })
    }

    proptest! {
        /// Whatever the arrival order, and wherever the state is stored and reloaded, the
        /// decided facts are the definitions applied in event-time order — as long as
        /// decisions only cover times whose events have all arrived (the lateness rule).
        #[test]
        fn facts_follow_event_time_whatever_the_arrival_order(
            mut events in prop::collection::vec(arb_event(), 1..40),
            order in prop::collection::vec(any::<u32>(), 40),
            cuts in prop::collection::vec(0usize..40, 0..4),
        ) {
            for (i, e) in events.iter_mut().enumerate() {
                e.event_id = format!("e{i}");
            }
            let expected = reference(&events);
            let mut arrivals = events.clone();
            let keys: Vec<u32> = (0..arrivals.len()).map(|i| order[i]).collect();
            let mut idx: Vec<usize> = (0..arrivals.len()).collect();
            idx.sort_by_key(|i| keys[*i]);
            arrivals = idx.iter().map(|i| events[*i].clone()).collect();
            // A horizon after arrival i may cover only times no later arrival has.
            let horizons: Vec<(usize, i64)> = cuts.iter().filter(|c| **c < arrivals.len()).map(|&c| {
                (c, arrivals[c..].iter().map(|e| e.event_time).min().unwrap_or(i64::MAX))
            }).collect();
            prop_assert_eq!(run(&arrivals, &horizons), expected);

            // Stored and reloaded at every step: the same facts.
            let mut session = Session::default();
            let mut facts = Vec::new();
            let mut buf = Vec::new();
            for (i, e) in arrivals.iter().enumerate() {
                for (_, h) in horizons.iter().filter(|(at, _)| *at == i) {
                    session.decide(*h, SLICE, &mut |t, _, f| facts.push((t, f)));
                }
                session.observe(e, HOUR, &mut |t, _, f| facts.push((t, f)));
                session.encode(&mut buf);
                let reloaded = Session::decode(&buf);
                prop_assert_eq!(reloaded.as_ref(), Some(&session));
                session = reloaded.unwrap();
            }
            session.decide(i64::MAX, SLICE, &mut |t, _, f| facts.push((t, f)));
            prop_assert_eq!(normalize(facts), reference(&events));
        }
    }
}
