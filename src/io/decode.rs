//! Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary), length-checked,
//! and Avro → [`PlaybackEvent`] resolving any registered writer schema against the reader schema
//! in `avro/playback_event.avsc`.
//!
//! Writer schemas are cached per id, with a prepared reader: when the writer schema is the
//! reader schema (the common case) records deserialize straight into the struct through serde,
//! without building a generic Avro value; other versions go through Avro schema resolution.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

use super::event_codec::decode_event_into;
use crate::error::{DecodeError, RegistryError};
use crate::io::registry::SchemaRegistry;
use crate::record::PlaybackEvent;

/// The reader schema of the input contract.
pub const PLAYBACK_EVENT_SCHEMA: &str = include_str!("../../avro/playback_event.avsc");

/// Splits a Confluent-framed value into its schema id and Avro payload.
pub fn split_frame(value: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match value {
        [0, a, b, c, d, payload @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), payload)),
        [magic, _, _, _, _, ..] => Err(DecodeError::BadMagic { found: *magic }),
        short => Err(DecodeError::Truncated { len: short.len() }),
    }
}

/// Prepends the Confluent header for `schema_id` to an Avro payload.
pub fn frame(schema_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Lookups of one schema id before a registry outage stops the instance: 5 waits of 0.2, 0.4,
/// 0.8, 1.6 and 3.2 s between 6 attempts, 6.2 s in all.
const REGISTRY_ATTEMPTS: u32 = 6;
/// How long a schema id that was unknown (or unreadable) stays rejected before it is looked
/// up again: a registry replica that lags a new registration must not dead-letter a schema
/// version until the next restart.
const RETRY_REJECTED_AFTER: Duration = Duration::from_secs(30);
/// Most rejected schema ids remembered at once, so random ids cannot grow memory.
const MAX_REJECTED: usize = 1_024;

/// How records of one writer schema are read.
enum Plan {
    /// Writer schema equals the reader schema: the specialised decoder
    /// ([`crate::io::event_codec`]), straight from the bytes into the struct.
    Direct,
    /// Another version: decode with the writer schema, resolve against the reader schema.
    Resolve(GenericDatumReader<'static>),
}

/// Decodes playback events, caching one `Plan` per schema id.
pub struct Decoder {
    registry: Arc<dyn SchemaRegistry>,
    reader: &'static Schema,
    reader_form: String,
    /// Plans of readable writer schemas, bounded by the versions registered for the topic.
    plans: HashMap<u32, Plan>,
    /// Ids that were not found or cannot be read, and when to look them up again: poison
    /// records stay cheap, and a late registration is picked up.
    rejected: HashMap<u32, (DecodeError, Instant)>,
    retry_rejected_after: Duration,
}

impl Decoder {
    /// A decoder that looks writer schemas up in `registry`.
    pub fn new(registry: Arc<dyn SchemaRegistry>) -> Self {
        let reader = leak(
            Schema::parse_str(PLAYBACK_EVENT_SCHEMA).expect("avro/playback_event.avsc is valid"),
        );
        Self {
            registry,
            reader_form: reader.canonical_form(),
            reader,
            plans: HashMap::new(),
            rejected: HashMap::new(),
            retry_rejected_after: RETRY_REJECTED_AFTER,
        }
    }

    /// Looks rejected schema ids up again after `after` (tests use a short time).
    pub fn retry_rejected_after(mut self, after: Duration) -> Self {
        self.retry_rejected_after = after;
        self
    }

    /// Decodes one record. The outer error is operational (the registry is unreachable); the
    /// inner one is bad data, bound for the dead-letter topic.
    pub fn decode(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Result<PlaybackEvent, DecodeError>, RegistryError> {
        let mut event = PlaybackEvent::default();
        Ok(self.decode_into(key, value, &mut event)?.map(|()| event))
    }

    /// [`Decoder::decode`] into `event`, reusing its buffers; after an error it holds a
    /// partial record.
    pub fn decode_into(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        event: &mut PlaybackEvent,
    ) -> Result<Result<(), DecodeError>, RegistryError> {
        if key.is_none_or(|k| k.is_empty()) {
            return Ok(Err(DecodeError::MissingKey));
        }
        let Some(value) = value else {
            return Ok(Err(DecodeError::MissingValue));
        };
        let (id, mut payload) = match split_frame(value) {
            Ok(parts) => parts,
            Err(e) => return Ok(Err(e)),
        };
        if !self.plans.contains_key(&id) {
            let now = Instant::now();
            if let Some((e, until)) = self.rejected.get(&id) {
                if now < *until {
                    return Ok(Err(e.clone()));
                }
            }
            match self.plan(id)? {
                Ok(plan) => {
                    self.rejected.remove(&id);
                    self.plans.insert(id, plan);
                }
                Err(e) => {
                    self.reject(id, e.clone(), now);
                    return Ok(Err(e));
                }
            }
        }
        let plan = &self.plans[&id];
        let bad = |e: apache_avro::Error| DecodeError::BadPayload {
            id,
            message: e.to_string(),
        };
        let decoded = match plan {
            Plan::Direct => decode_event_into(&mut payload, event)
                .map_err(|message| DecodeError::BadPayload { id, message }),
            Plan::Resolve(reader) => reader
                .read_value(&mut payload)
                .and_then(|v| apache_avro::from_value::<PlaybackEvent>(&v))
                .map(|resolved| *event = resolved)
                .map_err(bad),
        };
        Ok(match decoded {
            Ok(_) if !payload.is_empty() => Err(DecodeError::BadPayload {
                id,
                message: format!("{} trailing bytes after the record", payload.len()),
            }),
            other => other,
        })
    }

    fn reject(&mut self, id: u32, e: DecodeError, now: Instant) {
        if self.rejected.len() >= MAX_REJECTED {
            self.rejected.retain(|_, (_, until)| now < *until);
            if self.rejected.len() >= MAX_REJECTED {
                self.rejected.clear();
            }
        }
        self.rejected
            .insert(id, (e, now + self.retry_rejected_after));
    }

    /// Looks up a writer schema, riding out a short registry outage before giving up.
    fn fetch(&self, id: u32) -> Result<String, RegistryError> {
        let mut backoff = Duration::from_millis(200);
        for _ in 0..REGISTRY_ATTEMPTS - 1 {
            match self.registry.schema_by_id(id) {
                Err(RegistryError::Unavailable { url, message }) => {
                    tracing::warn!(id, %url, %message, ?backoff, "schema registry unavailable; retrying");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
                other => return other,
            }
        }
        self.registry.schema_by_id(id)
    }

    fn plan(&self, id: u32) -> Result<Result<Plan, DecodeError>, RegistryError> {
        let text = match self.fetch(id) {
            Ok(text) => text,
            Err(RegistryError::NotFound { message, .. }) => {
                return Ok(Err(DecodeError::UnknownSchema { id, message }))
            }
            Err(e) => return Err(e),
        };
        let incompatible = |message: String| DecodeError::IncompatibleSchema { id, message };
        let writer = match Schema::parse_str(&text) {
            Ok(schema) => schema,
            Err(e) => return Ok(Err(incompatible(e.to_string()))),
        };
        if let Err(e) = SchemaCompatibility::can_read(&writer, self.reader) {
            return Ok(Err(incompatible(e.to_string())));
        }
        // Bounded by the number of schemas ever registered for the topic.
        let plan = if writer.canonical_form() == self.reader_form {
            Ok(Plan::Direct)
        } else {
            GenericDatumReader::builder(leak(writer))
                .reader_schema(self.reader)
                .build()
                .map(Plan::Resolve)
        };
        Ok(plan.map_err(|e| incompatible(e.to_string())))
    }
}

fn leak(schema: Schema) -> &'static Schema {
    Box::leak(Box::new(schema))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::registry::MemoryRegistry;
    use crate::io::sink::AvroEncoder;

    fn event() -> PlaybackEvent {
        crate::tools::gen::Generator::new(crate::tools::gen::GenOptions::default())
            .next()
            .unwrap()
            .event
    }

    #[test]
    fn frames_are_length_checked() {
        assert_eq!(split_frame(&[]), Err(DecodeError::Truncated { len: 0 }));
        assert_eq!(
            split_frame(&[0, 0, 0, 1]),
            Err(DecodeError::Truncated { len: 4 })
        );
        assert_eq!(
            split_frame(&[1, 0, 0, 0, 1]),
            Err(DecodeError::BadMagic { found: 1 })
        );
        assert_eq!(split_frame(&frame(7, b"xy")), Ok((7, &b"xy"[..])));
    }

    #[test]
    fn decodes_what_was_encoded_and_rejects_what_does_not_fit() {
        let registry = Arc::new(MemoryRegistry::default());
        let encoder =
            AvroEncoder::register(registry.as_ref(), "e-value", PLAYBACK_EVENT_SCHEMA).unwrap();
        let e = event();
        let value = encoder.encode(&e).unwrap();
        let mut decoder = Decoder::new(registry.clone());
        assert_eq!(decoder.decode(Some(b"k"), Some(&value)).unwrap(), Ok(e));
        assert_eq!(
            decoder.decode(None, Some(&value)).unwrap(),
            Err(DecodeError::MissingKey)
        );
        let mut trailing = value.clone();
        trailing.push(0);
        let err = decoder
            .decode(Some(b"k"), Some(&trailing))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.reason(), "bad_payload");
        let other = registry
            .register(
                "x-value",
                r#"{"type":"record","name":"X","fields":[{"name":"a","type":"int"}]}"#,
            )
            .unwrap();
        let err = decoder
            .decode(Some(b"k"), Some(&frame(other, &[2])))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.reason(), "incompatible_schema");
    }

    #[test]
    fn an_unknown_schema_id_is_looked_up_again_after_a_while() {
        let registry = Arc::new(MemoryRegistry::default());
        let mut decoder =
            Decoder::new(registry.clone()).retry_rejected_after(Duration::from_millis(50));
        let e = event();
        // The id the next registration gets, used before the registry knows it.
        let encoder = AvroEncoder::register(registry.as_ref(), "warm-value", r#""int""#).unwrap();
        let next = encoder.schema_id() + 1;
        let payload = AvroEncoder::register(registry.as_ref(), "e-value", PLAYBACK_EVENT_SCHEMA)
            .unwrap()
            .encode(&e)
            .unwrap()[5..]
            .to_vec();
        let unknown = frame(next + 1, &payload);
        let err = decoder.decode(Some(b"k"), Some(&unknown)).unwrap();
        assert_eq!(err.unwrap_err().reason(), "unknown_schema_id");
        let late = registry
            .register("late-value", &format!("{PLAYBACK_EVENT_SCHEMA} "))
            .unwrap();
        assert_eq!(
            late,
            next + 1,
            "the registration the record was waiting for"
        );
        assert!(
            decoder.decode(Some(b"k"), Some(&unknown)).unwrap().is_err(),
            "still cached"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(decoder.decode(Some(b"k"), Some(&unknown)).unwrap().is_ok());
    }

    #[test]
    fn rejected_ids_are_bounded() {
        let mut decoder = Decoder::new(Arc::new(MemoryRegistry::default()));
        for id in 0..(MAX_REJECTED as u32 * 3) {
            let _ = decoder.decode(Some(b"k"), Some(&frame(id + 1_000, &[2])));
        }
        assert!(decoder.rejected.len() <= MAX_REJECTED);
    }
}
