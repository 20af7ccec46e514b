//! Confluent framing and Avro decoding of any bytes: a record is an event or a dead letter
//! with a reason, never a panic, and an event either passes the bad-data rules or breaks one.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use marquee::io::decode::{Decoder, PLAYBACK_EVENT_SCHEMA};
use marquee::io::registry::{MemoryRegistry, SchemaRegistry};

/// Registry ids: 1 the reader schema, 2 a later version with an optional field, 3 an
/// unrelated record, 4 text that is not a schema at all.
fn decoder() -> &'static Mutex<Decoder> {
    static DECODER: OnceLock<Mutex<Decoder>> = OnceLock::new();
    DECODER.get_or_init(|| {
        let registry = MemoryRegistry::default();
        let v2 = PLAYBACK_EVENT_SCHEMA.replacen(
            r#""doc": "On ERROR."}"#,
            r#""doc": "On ERROR."},
    {"name": "hdr", "type": ["null", "boolean"], "default": null}"#,
            1,
        );
        let other =
            r#"{"type": "record", "name": "Other", "fields": [{"name": "a", "type": "long"}]}"#;
        for (subject, schema) in [
            ("v1", PLAYBACK_EVENT_SCHEMA),
            ("v2", &v2),
            ("o", other),
            ("x", "not a schema"),
        ] {
            registry.register(subject, schema).expect("memory registry");
        }
        Mutex::new(Decoder::new(Arc::new(registry)))
    })
}

fuzz_target!(|value: &[u8]| {
    let mut decoder = decoder().lock().unwrap_or_else(|e| e.into_inner());
    let decoded = decoder
        .decode(Some(b"session"), Some(value))
        .expect("an in-memory registry never fails");
    if let Ok(event) = decoded {
        let _ = marquee::check::check(&event, Some(event.event_time), 30_000);
    }
});
