//! Resume-table fixtures shared by the broker tests: the reference table and a reader of the
//! compacted output topic.

use std::collections::BTreeMap;
use std::time::Duration;

use marquee::record::{PlaybackEvent, ResumePosition};

use super::read_committed;

/// The reference: per key, the event with the largest (event_time, event_id).
pub fn expected_positions(events: &[PlaybackEvent]) -> BTreeMap<String, ResumePosition> {
    let mut newest: BTreeMap<String, &PlaybackEvent> = BTreeMap::new();
    for e in events {
        let key = marquee::record::resume_key(&e.profile_id, &e.title_id);
        let keep = newest
            .get(&key)
            .is_some_and(|n| (n.event_time, &n.event_id) >= (e.event_time, &e.event_id));
        if !keep {
            newest.insert(key, e);
        }
    }
    newest
        .into_iter()
        .map(|(key, e)| {
            let progress = e.duration_ms.map(|d| e.position_ms as f64 / d as f64);
            let position = ResumePosition {
                profile_id: e.profile_id.clone(),
                title_id: e.title_id.clone(),
                position_ms: e.position_ms,
                duration_ms: e.duration_ms,
                progress,
                completed: progress.is_some_and(|p| p >= 0.95),
                updated_at: e.event_time,
                device_type: e.device_type.clone(),
            };
            (key, position)
        })
        .collect()
}

/// The latest committed value per key of a resume-positions topic (tombstones delete).
pub fn topic_table(
    brokers: &str,
    topic: &str,
    at_least: usize,
) -> BTreeMap<String, ResumePosition> {
    let schema = apache_avro::Schema::parse_str(marquee::resume::RESUME_POSITION_SCHEMA).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap();
    let mut table = BTreeMap::new();
    for r in read_committed(
        brokers,
        topic,
        at_least,
        Duration::from_millis(500),
        Duration::from_secs(20),
    ) {
        let key = r.key_str();
        match r.value {
            None => {
                table.remove(&key);
            }
            Some(v) => {
                let (_, mut payload) = marquee::io::decode::split_frame(&v).unwrap();
                let value = reader.read_value(&mut payload).unwrap();
                table.insert(key, apache_avro::from_value(&value).unwrap());
            }
        }
    }
    table
}

/// Whether every key's answer from whichever instance owns it (the others answer 421; one
/// that is down or restarting answers nothing) equals the reference; the first difference
/// otherwise.
pub fn owners_answer(
    instances: &[String],
    expected: &BTreeMap<String, ResumePosition>,
) -> Result<(), String> {
    for (key, want) in expected {
        let path = format!("/profiles/{}/titles/{}", want.profile_id, want.title_id);
        let want_json = serde_json::to_value(want).unwrap();
        let answers: Vec<(&str, u16, String)> = instances
            .iter()
            .map(|http| {
                let (status, body) = super::http_get(http, &path);
                (http.as_str(), status, body)
            })
            .filter(|(_, status, _)| *status != 421 && *status != 0)
            .collect();
        let [(_, 200, body)] = answers.as_slice() else {
            return Err(format!(
                "{key}: answers {answers:?}, expected one owner's 200"
            ));
        };
        let got: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        if got != want_json {
            return Err(format!("{key}: {got}, expected {want_json}"));
        }
    }
    Ok(())
}

/// The keys whose value in `got` differs from `want` (missing or extra included), for a
/// failure message.
pub fn table_diff(
    got: &BTreeMap<String, ResumePosition>,
    want: &BTreeMap<String, ResumePosition>,
) -> Vec<(String, Option<ResumePosition>, Option<ResumePosition>)> {
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    keys.into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .map(|k| (k.clone(), want.get(k).cloned(), got.get(k).cloned()))
        .collect()
}
