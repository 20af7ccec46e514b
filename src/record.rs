//! The values that flow through the pipeline: input events, where they came from, and results.

use serde::{Deserialize, Serialize};

/// What happened in a playback session (the `EventType` enum of `avro/playback_event.avsc`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    #[default]
    Start,
    Play,
    Heartbeat,
    Pause,
    Resume,
    Seek,
    RebufferStart,
    RebufferEnd,
    BitrateChange,
    Error,
    End,
}

/// One client playback event, the input contract (`avro/playback_event.avsc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackEvent {
    pub event_id: String,
    pub session_id: String,
    pub account_id: String,
    pub profile_id: String,
    pub device_id: String,
    pub device_type: String,
    pub title_id: String,
    pub country: String,
    pub cdn: String,
    pub event_type: EventType,
    /// Client clock, epoch milliseconds.
    pub event_time: i64,
    pub position_ms: i64,
    pub duration_ms: Option<i64>,
    pub play_ms: i64,
    pub rebuffer_ms: i64,
    pub startup_ms: Option<i64>,
    pub bitrate_kbps: Option<i32>,
    pub error_code: Option<String>,
}

/// Where a record was read from; travels with it so late and dead-letter copies can say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    /// Broker (or producer create) timestamp in epoch millis, used by the clock-skew guard.
    pub timestamp: Option<i64>,
}

/// One window result for one group, the output contract (`avro/qos_window.avsc`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QosWindow {
    pub window_start: i64,
    pub window_end: i64,
    pub dimension: String,
    pub value: String,
    pub concurrent_viewers: i64,
    pub play_ms: i64,
    pub rebuffer_ms: i64,
    pub rebuffer_events: i64,
    pub rebuffer_ratio: Option<f64>,
    pub is_final: bool,
    /// Sessions whose START falls in the window (QoE; `None` when not computed).
    #[serde(default)]
    pub attempts: Option<i64>,
    /// Sessions whose first ERROR comes before any PLAY, counted in the ERROR's window.
    #[serde(default)]
    pub video_start_failures: Option<i64>,
    /// Sessions whose first END comes before any PLAY and ERROR, in the END's window.
    #[serde(default)]
    pub exits_before_video_start: Option<i64>,
    /// Quantiles of the startup time of first PLAYs in the window (relative error ≤ 1%).
    #[serde(default)]
    pub startup_ms_p50: Option<f64>,
    #[serde(default)]
    pub startup_ms_p90: Option<f64>,
    #[serde(default)]
    pub startup_ms_p99: Option<f64>,
    /// Σ(bitrate × play_ms) / Σ play_ms at each event's current rendition.
    #[serde(default)]
    pub avg_bitrate_kbps: Option<f64>,
}

impl QosWindow {
    /// The deterministic output key `<dimension>/<value>/<window_start>`: a replay overwrites.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            key_part(&self.dimension),
            key_part(&self.value),
            self.window_start
        )
    }
}

/// `rebuffer_ms / (play_ms + rebuffer_ms)`, or `None` when nothing was played or stalled.
pub fn rebuffer_ratio(play_ms: i64, rebuffer_ms: i64) -> Option<f64> {
    let total = play_ms + rebuffer_ms;
    (total > 0).then(|| rebuffer_ms as f64 / total as f64)
}

/// Distinct accounts and profiles of one UTC day and group, the output contract
/// (`avro/daily_active.avsc`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DailyActive {
    /// 00:00 UTC of the day, epoch millis.
    pub day: i64,
    pub dimension: String,
    pub value: String,
    pub accounts: i64,
    pub profiles: i64,
    /// False when counted with a sketch.
    pub exact: bool,
    /// False for a running value during the day.
    pub is_final: bool,
}

impl DailyActive {
    /// The deterministic output key `<dimension>/<value>/<day>`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            key_part(&self.dimension),
            key_part(&self.value),
            self.day
        )
    }
}

/// Where a profile stopped in a title, the output contract (`avro/resume_position.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumePosition {
    pub profile_id: String,
    pub title_id: String,
    pub position_ms: i64,
    pub duration_ms: Option<i64>,
    pub progress: Option<f64>,
    pub completed: bool,
    /// event_time of the newest event, epoch millis.
    pub updated_at: i64,
    pub device_type: String,
}

impl ResumePosition {
    /// The output and table key `<profile_id>/<title_id>`.
    pub fn key(&self) -> String {
        resume_key(&self.profile_id, &self.title_id)
    }
}

/// The output key of a resume entry: `<profile_id>/<title_id>`, each part escaped.
pub fn resume_key(profile: &str, title: &str) -> String {
    format!("{}/{}", key_part(profile), key_part(title))
}

/// The profile and title of a resume key; `None` when it is not one.
pub fn split_resume_key(key: &str) -> Option<(String, String)> {
    let [profile, title]: [String; 2] = split_key(key)?.try_into().ok()?;
    Some((profile, title))
}

/// Escapes one part of a `/`-separated output key: `%` becomes `%25` and `/` becomes `%2F`,
/// so that any identifier (with `/`, NUL or any other character) round-trips and no two
/// entries share a key. Parts without `%` or `/` are unchanged.
pub fn key_part(part: &str) -> std::borrow::Cow<'_, str> {
    if !part.contains(['%', '/']) {
        return part.into();
    }
    part.replace('%', "%25").replace('/', "%2F").into()
}

/// Splits an output key into its unescaped parts; `None` when an escape is malformed.
pub fn split_key(key: &str) -> Option<Vec<String>> {
    key.split('/')
        .map(|part| {
            let mut out = String::with_capacity(part.len());
            let mut rest = part;
            while let Some(i) = rest.find('%') {
                out.push_str(&rest[..i]);
                match rest.get(i + 1..i + 3) {
                    Some("25") => out.push('%'),
                    Some("2F") => out.push('/'),
                    _ => return None,
                }
                rest = &rest[i + 3..];
            }
            out.push_str(rest);
            Some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn key_parts_round_trip(a in ".{0,12}", b in ".{0,12}") {
            let key = resume_key(&a, &b);
            proptest::prop_assert_eq!(split_key(&key), Some(vec![a, b]));
        }

        #[test]
        fn distinct_entries_have_distinct_keys(a in "[a/%]{0,6}", b in "[a/%]{0,6}", c in "[a/%]{0,6}", d in "[a/%]{0,6}") {
            proptest::prop_assume!((&a, &b) != (&c, &d));
            proptest::prop_assert_ne!(resume_key(&a, &b), resume_key(&c, &d));
        }
    }

    #[test]
    fn plain_identifiers_keep_their_keys() {
        assert_eq!(resume_key("p-1", "t-9"), "p-1/t-9");
        assert_eq!(resume_key("a/b", "50%"), "a%2Fb/50%25");
        assert_eq!(split_key("a%2Fb/50%25").unwrap(), ["a/b", "50%"]);
        assert_eq!(split_key("bad%zz"), None);
    }
}
