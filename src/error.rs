//! Typed errors per boundary, and the bad-data policy.
//!
//! Bad data never stops the pipeline: a record that fails to decode or cannot be trusted
//! becomes a [`DecodeError`], whose [`DecodeError::reason`] goes into the dead-letter header
//! `marquee.reason` and the metric label. Everything else here is an operational failure that
//! stops the instance; it restarts from its last checkpoint and loses nothing.

use std::path::PathBuf;

/// A topology file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read topology {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("topology {file} is not valid TOML for a Marquee topology: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("topology {file} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        file: PathBuf,
        problems: Vec<String>,
    },
}

/// Why one input record could not become an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no key (expected the session id as UTF-8)")]
    MissingKey,
    #[error("record has no value")]
    MissingValue,
    #[error("value is {len} bytes, shorter than the 5-byte Confluent header")]
    Truncated { len: usize },
    #[error("value starts with magic byte {found}, expected 0 (Confluent wire format)")]
    BadMagic { found: u8 },
    #[error("schema id {id} is unknown to the registry: {message}")]
    UnknownSchema { id: u32, message: String },
    #[error("schema id {id} cannot be read as a PlaybackEvent: {message}")]
    IncompatibleSchema { id: u32, message: String },
    #[error("Avro payload does not match schema id {id}: {message}")]
    BadPayload { id: u32, message: String },
    #[error(
        "event_time {event_time} is outside 2000-01-01..2100-01-01 (epoch millis {}..{})",
        crate::check::MIN_EVENT_TIME,
        crate::check::MAX_EVENT_TIME
    )]
    EventTimeOutOfRange { event_time: i64 },
    #[error("{field} is {value}, outside 0..={max}")]
    FieldOutOfRange {
        field: &'static str,
        value: i64,
        max: i64,
    },
    #[error("{field} is {len} bytes long, longer than the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("event_time {event_time} is {ahead_ms}ms ahead of the record's Kafka timestamp (limit {limit_ms}ms)")]
    FutureSkew {
        event_time: i64,
        ahead_ms: i64,
        limit_ms: i64,
    },
}

impl DecodeError {
    /// A short, bounded label for headers and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::MissingKey => "missing_key",
            DecodeError::MissingValue => "missing_value",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::BadMagic { .. } => "bad_magic_byte",
            DecodeError::UnknownSchema { .. } => "unknown_schema_id",
            DecodeError::IncompatibleSchema { .. } => "incompatible_schema",
            DecodeError::BadPayload { .. } => "bad_payload",
            DecodeError::FutureSkew { .. } => "future_event_time",
            DecodeError::EventTimeOutOfRange { .. } => "event_time_out_of_range",
            DecodeError::FieldOutOfRange { .. } => "field_out_of_range",
            DecodeError::FieldTooLong { .. } => "field_too_long",
        }
    }
}

/// A schema registry that could not be reached or answered nonsense.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {id} not found in the registry at {url}: {message}")]
    NotFound {
        id: u32,
        url: String,
        message: String,
    },
    #[error("schema registry at {url} failed ({message}); is it running and reachable?")]
    Unavailable { url: String, message: String },
    #[error("schema registry returned a schema that is not valid Avro: {0}")]
    InvalidSchema(String),
}

/// The local RocksDB state failed.
#[cfg(feature = "runtime")]
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state store at {dir}: {source}")]
    Open {
        dir: PathBuf,
        source: rocksdb::Error,
    },
    #[error("state store I/O failed: {0}")]
    Io(#[from] rocksdb::Error),
    #[error("state entry {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// An operational failure that stops the instance (it resumes from its last checkpoint).
#[cfg(feature = "runtime")]
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cause is part of the message (not a `source`), so it is printed once.
    #[error("Kafka error while {context}: {cause}")]
    Kafka {
        context: String,
        cause: rdkafka::error::KafkaError,
    },
    #[error("cannot encode {what} as Avro: {message}")]
    Encode { what: String, message: String },
    #[error("{0}")]
    Other(String),
}

#[cfg(feature = "runtime")]
impl PipelineError {
    /// Wraps a Kafka error with what Marquee was doing.
    pub fn kafka(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        let context = context.into();
        move |cause| PipelineError::Kafka { context, cause }
    }

    /// A transaction failed without fencing the producer (a rebalance changed the group's
    /// generation, a coordinator moved): after its abort, it may be tried again.
    pub fn is_retriable_transaction(&self) -> bool {
        matches!(
            self,
            PipelineError::Kafka {
                cause: rdkafka::error::KafkaError::Transaction(e),
                ..
            } if !e.is_fatal()
        )
    }
}
