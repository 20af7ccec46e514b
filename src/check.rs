//! The bad-data rules every decoded event passes before any operator sees it. An event that
//! breaks one is dead-lettered with the rule's reason and changes nothing; the limits are
//! documented in the README ("Bad data and failure rules").

use crate::error::DecodeError;
use crate::record::PlaybackEvent;

/// Earliest trusted event time: 2000-01-01T00:00:00Z. Older clocks are broken, not late.
pub const MIN_EVENT_TIME: i64 = 946_684_800_000;
/// Latest event time accepted at all: 2100-01-01T00:00:00Z (far from any i64 overflow).
pub const MAX_EVENT_TIME: i64 = 4_102_444_800_000;
/// Most play or rebuffer time one event may report: a day.
pub const MAX_SPAN_MS: i64 = 86_400_000;
/// Largest playhead or runtime: a week of video.
pub const MAX_POSITION_MS: i64 = 7 * 86_400_000;
/// Largest bitrate in kbit/s.
pub const MAX_BITRATE_KBPS: i32 = 1_000_000;
/// Longest identifier (`event_id`, `session_id`, `account_id`, `profile_id`, `device_id`,
/// `title_id`, `error_code`), in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest grouping value (`device_type`, `country`, `cdn`), in bytes.
pub const MAX_DIMENSION_BYTES: usize = 64;

/// Checks `event`, read from a record with Kafka timestamp `timestamp`, against every rule.
pub fn check(
    event: &PlaybackEvent,
    timestamp: Option<i64>,
    max_future_skew_ms: i64,
) -> Result<(), DecodeError> {
    let t = event.event_time;
    if !(MIN_EVENT_TIME..MAX_EVENT_TIME).contains(&t) {
        return Err(DecodeError::EventTimeOutOfRange { event_time: t });
    }
    // One client clock far in the future must not drag a watermark forward.
    if let Some(ts) = timestamp {
        let ahead_ms = t.saturating_sub(ts);
        if ahead_ms > max_future_skew_ms {
            return Err(DecodeError::FutureSkew {
                event_time: t,
                ahead_ms,
                limit_ms: max_future_skew_ms,
            });
        }
    }
    let numbers = [
        ("play_ms", Some(event.play_ms), MAX_SPAN_MS),
        ("rebuffer_ms", Some(event.rebuffer_ms), MAX_SPAN_MS),
        ("startup_ms", event.startup_ms, MAX_SPAN_MS),
        ("position_ms", Some(event.position_ms), MAX_POSITION_MS),
        ("duration_ms", event.duration_ms, MAX_POSITION_MS),
        (
            "bitrate_kbps",
            event.bitrate_kbps.map(i64::from),
            i64::from(MAX_BITRATE_KBPS),
        ),
    ];
    for (field, value, max) in numbers {
        if let Some(value) = value.filter(|v| !(0..=max).contains(v)) {
            return Err(DecodeError::FieldOutOfRange { field, value, max });
        }
    }
    let strings = [
        ("event_id", event.event_id.as_str(), MAX_ID_BYTES),
        ("session_id", &event.session_id, MAX_ID_BYTES),
        ("account_id", &event.account_id, MAX_ID_BYTES),
        ("profile_id", &event.profile_id, MAX_ID_BYTES),
        ("device_id", &event.device_id, MAX_ID_BYTES),
        ("title_id", &event.title_id, MAX_ID_BYTES),
        (
            "error_code",
            event.error_code.as_deref().unwrap_or_default(),
            MAX_ID_BYTES,
        ),
        ("device_type", &event.device_type, MAX_DIMENSION_BYTES),
        ("country", &event.country, MAX_DIMENSION_BYTES),
        ("cdn", &event.cdn, MAX_DIMENSION_BYTES),
    ];
    for (field, value, max) in strings {
        if value.len() > max {
            return Err(DecodeError::FieldTooLong {
                field,
                len: value.len(),
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::gen::{GenOptions, Generator};

    fn event() -> PlaybackEvent {
        Generator::new(GenOptions::default())
            .find(|a| a.event.play_ms > 0)
            .unwrap()
            .event
    }

    /// A change that breaks one rule.
    type Mutation = fn(&mut PlaybackEvent);

    fn reason(e: &PlaybackEvent) -> Option<&'static str> {
        check(e, Some(e.event_time), 30_000)
            .err()
            .map(|e| e.reason())
    }

    #[test]
    fn generated_events_pass() {
        for a in Generator::new(GenOptions::default()).take(5_000) {
            assert_eq!(reason(&a.event), None, "{:?}", a.event);
        }
    }

    #[test]
    fn each_rule_has_its_reason() {
        let cases: [(&str, Mutation); 10] = [
            ("event_time_out_of_range", |e| e.event_time = 0),
            ("event_time_out_of_range", |e| e.event_time = i64::MAX),
            ("event_time_out_of_range", |e| e.event_time = i64::MIN),
            ("field_out_of_range", |e| e.play_ms = -1),
            ("field_out_of_range", |e| e.rebuffer_ms = MAX_SPAN_MS + 1),
            ("field_out_of_range", |e| e.position_ms = -5),
            ("field_out_of_range", |e| e.duration_ms = Some(i64::MIN)),
            ("field_out_of_range", |e| e.bitrate_kbps = Some(-1)),
            ("field_too_long", |e| e.cdn = "x".repeat(600_000)),
            ("field_too_long", |e| e.profile_id = "p".repeat(257)),
        ];
        for (expected, mutate) in cases {
            let mut e = event();
            mutate(&mut e);
            assert_eq!(reason(&e), Some(expected));
        }
    }

    #[test]
    fn the_skew_guard_uses_the_kafka_timestamp_without_overflow() {
        let e = event();
        assert!(check(&e, Some(e.event_time - 30_000), 30_000).is_ok());
        let err = check(&e, Some(e.event_time - 30_001), 30_000).unwrap_err();
        assert_eq!(err.reason(), "future_event_time");
        assert_eq!(
            check(&e, Some(i64::MIN), 30_000).unwrap_err().reason(),
            "future_event_time"
        );
        assert!(check(&e, None, 30_000).is_ok());
    }
}
