//! The Kafka and Avro edges: the consumer and its positions, Confluent framing and Avro
//! decoding, schema registries, and the producer with its result, late and dead-letter copies.

#[cfg(feature = "runtime")]
pub mod changelog;
pub mod decode;
pub mod event_codec;
pub mod registry;
#[cfg(feature = "runtime")]
pub mod sink;
#[cfg(feature = "runtime")]
pub mod source;
