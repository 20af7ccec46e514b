//! The values that flow through the pipeline: input events, where they came from, and results.

use serde::{Deserialize, Serialize};

/// What happened in a playback session (the `EventType` enum of `avro/playback_event.avsc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

impl QosWindow {
    /// The deterministic output key `<dimension>/<value>/<window_start>`: a replay overwrites.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.dimension, self.value, self.window_start)
    }
}

/// `rebuffer_ms / (play_ms + rebuffer_ms)`, or `None` when nothing was played or stalled.
pub fn rebuffer_ratio(play_ms: i64, rebuffer_ms: i64) -> Option<f64> {
    let total = play_ms + rebuffer_ms;
    (total > 0).then(|| rebuffer_ms as f64 / total as f64)
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
        format!("{}/{}", self.profile_id, self.title_id)
    }
}
