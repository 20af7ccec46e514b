//! A decoder specialised for `PlaybackEvent` records written with the reader schema itself
//! (the common case): it reads the Avro binary encoding field by field straight into the
//! struct, without serde or a generic value. It accepts and refuses exactly what apache-avro
//! does for that schema (zig-zag varints of at most ten bytes, `int` within 32 bits,
//! non-negative string lengths, valid UTF-8, known enum symbols and union branches):
//! differentially tested below and fuzzed (`fuzz/fuzz_targets/decode.rs`).

use crate::record::{EventType, PlaybackEvent};

/// The symbols of `EventType` in schema order.
const EVENT_TYPES: [EventType; 11] = [
    EventType::Start,
    EventType::Play,
    EventType::Heartbeat,
    EventType::Pause,
    EventType::Resume,
    EventType::Seek,
    EventType::RebufferStart,
    EventType::RebufferEnd,
    EventType::BitrateChange,
    EventType::Error,
    EventType::End,
];

/// Decodes one event from the front of `bytes`, advancing it past the record.
pub fn decode_event(bytes: &mut &[u8]) -> Result<PlaybackEvent, String> {
    let mut event = PlaybackEvent::default();
    decode_event_into(bytes, &mut event)?;
    Ok(event)
}

/// [`decode_event`] into `e`, reusing its strings' buffers (the hot path allocates nothing
/// once they have grown). On an error `e` holds a partial record.
pub fn decode_event_into(bytes: &mut &[u8], e: &mut PlaybackEvent) -> Result<(), String> {
    let mut r = Reader { bytes };
    r.string_into("event_id", &mut e.event_id)?;
    r.string_into("session_id", &mut e.session_id)?;
    r.string_into("account_id", &mut e.account_id)?;
    r.string_into("profile_id", &mut e.profile_id)?;
    r.string_into("device_id", &mut e.device_id)?;
    r.string_into("device_type", &mut e.device_type)?;
    r.string_into("title_id", &mut e.title_id)?;
    r.string_into("country", &mut e.country)?;
    r.string_into("cdn", &mut e.cdn)?;
    e.event_type = {
        let index = r.long("event_type")?;
        usize::try_from(index)
            .ok()
            .and_then(|i| EVENT_TYPES.get(i).copied())
            .ok_or_else(|| format!("event_type: no symbol at index {index}"))?
    };
    e.event_time = r.long("event_time")?;
    e.position_ms = r.long("position_ms")?;
    e.duration_ms = r.optional("duration_ms", Reader::long)?;
    e.play_ms = r.long("play_ms")?;
    e.rebuffer_ms = r.long("rebuffer_ms")?;
    e.startup_ms = r.optional("startup_ms", Reader::long)?;
    e.bitrate_kbps = r.optional("bitrate_kbps", Reader::int)?;
    e.error_code = r.optional("error_code", Reader::string)?;
    Ok(())
}

struct Reader<'a, 'b> {
    bytes: &'b mut &'a [u8],
}

impl Reader<'_, '_> {
    fn byte(&mut self, field: &str) -> Result<u8, String> {
        let (&first, rest) = self
            .bytes
            .split_first()
            .ok_or_else(|| format!("{field}: the record ends early"))?;
        *self.bytes = rest;
        Ok(first)
    }

    /// A zig-zag varint: at most ten bytes, bits past the 64th dropped (as apache-avro does).
    fn long(&mut self, field: &str) -> Result<i64, String> {
        let mut z = 0u64;
        for shift in (0..10).map(|j| j * 7) {
            let b = self.byte(field)?;
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(format!(
            "{field}: integer overflow (a varint of more than ten bytes)"
        ))
    }

    fn int(&mut self, field: &str) -> Result<i32, String> {
        let n = self.long(field)?;
        i32::try_from(n).map_err(|_| format!("{field}: {n} does not fit an int"))
    }

    fn string(&mut self, field: &str) -> Result<String, String> {
        let mut text = String::new();
        self.string_into(field, &mut text)?;
        Ok(text)
    }

    fn string_into(&mut self, field: &str, out: &mut String) -> Result<(), String> {
        let len = self.long(field)?;
        let len = usize::try_from(len).map_err(|_| format!("{field}: negative length {len}"))?;
        if len > self.bytes.len() {
            return Err(format!(
                "{field}: a string of {len} bytes, {} left in the record",
                self.bytes.len()
            ));
        }
        let (text, rest) = self.bytes.split_at(len);
        *self.bytes = rest;
        out.clear();
        out.push_str(std::str::from_utf8(text).map_err(|e| format!("{field}: {e}"))?);
        Ok(())
    }

    /// A `["null", T]` union.
    fn optional<T>(
        &mut self,
        field: &str,
        read: impl FnOnce(&mut Self, &str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.long(field)? {
            0 => Ok(None),
            1 => read(self, field).map(Some),
            other => Err(format!("{field}: no union branch {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::decode::PLAYBACK_EVENT_SCHEMA;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::Schema;
    use proptest::prelude::*;

    /// What apache-avro makes of `bytes`, for comparison.
    fn reference(bytes: &[u8]) -> Result<(PlaybackEvent, usize), ()> {
        let schema = Schema::parse_str(PLAYBACK_EVENT_SCHEMA).unwrap();
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        let mut rest = bytes;
        let event = reader
            .read_deser::<PlaybackEvent>(&mut rest)
            .map_err(|_| ())?;
        Ok((event, rest.len()))
    }

    fn encode(event: &PlaybackEvent) -> Vec<u8> {
        let schema = Schema::parse_str(PLAYBACK_EVENT_SCHEMA).unwrap();
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_ser_to_vec(event)
            .unwrap()
    }

    fn any_event() -> impl Strategy<Value = PlaybackEvent> {
        let text = || "\\PC{0,12}";
        (
            (
                text(),
                text(),
                text(),
                text(),
                text(),
                text(),
                text(),
                text(),
                text(),
            ),
            (0usize..11, any::<i64>(), any::<i64>(), any::<Option<i64>>()),
            (
                any::<i64>(),
                any::<i64>(),
                any::<Option<i64>>(),
                any::<Option<i32>>(),
                prop::option::of(text()),
            ),
        )
            .prop_map(
                |(
                    (a, b, c, d, e, f, g, h, i),
                    (k, t, pos, dur),
                    (play, rebuf, startup, bitrate, code),
                )| {
                    PlaybackEvent {
                        event_id: a,
                        session_id: b,
                        account_id: c,
                        profile_id: d,
                        device_id: e,
                        device_type: f,
                        title_id: g,
                        country: h,
                        cdn: i,
                        event_type: EVENT_TYPES[k],
                        event_time: t,
                        position_ms: pos,
                        duration_ms: dur,
                        play_ms: play,
                        rebuffer_ms: rebuf,
                        startup_ms: startup,
                        bitrate_kbps: bitrate,
                        error_code: code,
                    }
                },
            )
    }

    proptest! {
        /// Any event apache-avro writes decodes to itself, with nothing left over.
        #[test]
        fn decodes_what_apache_avro_writes(event in any_event()) {
            let bytes = encode(&event);
            let mut rest = &bytes[..];
            prop_assert_eq!(decode_event(&mut rest), Ok(event));
            prop_assert!(rest.is_empty());
        }

        /// On mangled records (bytes flipped, cut or appended) both decoders agree: the same
        /// event and the same bytes left, or both refuse.
        #[test]
        fn agrees_with_apache_avro_on_mangled_records(
            event in any_event(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            tail in prop::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut bytes = encode(&event);
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend(tail);
            let mut rest = &bytes[..];
            let ours = decode_event(&mut rest).map(|e| (e, rest.len())).map_err(|_| ());
            prop_assert_eq!(ours, reference(&bytes));
        }
    }

    #[test]
    fn overlong_varints_and_bad_branches_are_refused_with_the_field() {
        let mut bytes: &[u8] = &[0xff; 11];
        assert!(decode_event(&mut bytes)
            .unwrap_err()
            .contains("event_id: integer overflow"));
        let mut event = encode(&PlaybackEvent {
            bitrate_kbps: None,
            error_code: None,
            ..crate::tools::gen::Generator::new(Default::default())
                .next()
                .unwrap()
                .event
        });
        let at = event.len() - 2; // bitrate_kbps's branch, before error_code's
        event[at] = 4;
        let message = decode_event(&mut &event[..]).unwrap_err();
        assert!(
            message.contains("bitrate_kbps: no union branch 2"),
            "{message}"
        );
    }
}
