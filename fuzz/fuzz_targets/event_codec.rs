//! Differential: the specialised `PlaybackEvent` decoder and apache-avro agree on any bytes,
//! the same event and the same bytes left over, or both refuse.
#![no_main]

use std::sync::OnceLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::Schema;
use libfuzzer_sys::fuzz_target;
use marquee::io::decode::PLAYBACK_EVENT_SCHEMA;
use marquee::io::event_codec::decode_event;
use marquee::record::PlaybackEvent;

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse_str(PLAYBACK_EVENT_SCHEMA).expect("the reader schema"))
}

fuzz_target!(|data: &[u8]| {
    let mut ours = data;
    let ours = decode_event(&mut ours).map(|e| (e, ours.len())).ok();
    let reader = GenericDatumReader::builder(schema())
        .build()
        .expect("a reader");
    let mut theirs = data;
    let theirs = reader
        .read_deser::<PlaybackEvent>(&mut theirs)
        .map(|e| (e, theirs.len()))
        .ok();
    assert_eq!(ours, theirs);
});
