//! Marquee: a real-time stream processor for video-streaming playback events.
//!
//! ```text
//! Kafka ──► source ──► decode ──► watermark ──► windows ──► emit ──► sink ──► derived topics
//!          (group)    (Avro +     (per          (per         (on      (results, late,
//!                      registry)   partition)    partition)   close)   dead letters)
//!                                                   │
//!                                      state (RocksDB: windows + offsets + watermarks)
//!
//! Kafka ──► repartition by profile ──► table (newest by event time) ──► resume-positions
//!                                         │                              (compacted)
//!                                   state (RocksDB: resume table) ◄── restore from the topic
//!
//!   /metrics · /healthz · /readyz · /profiles/… queries  ◄── HTTP at the side
//! ```
//!
//! # Layout
//!
//! - [`config`]: topology files, defaults and validation.
//! - [`error`]: typed errors per boundary and the bad-data policy.
//! - [`record`]: the input event and the output records.
//! - [`registry`]: Confluent schema registry client, in-memory and embedded registries.
//! - [`source`]: the consumer group, rebalances, pause/resume, offset commits.
//! - [`decode`]: Confluent framing and Avro decoding with schema resolution.
//! - [`check`]: the bad-data rules (event-time range, clock skew, numeric ranges, lengths).
//! - [`watermark`]: per-partition watermarks, idleness, the operator watermark.
//! - [`window`]: tumbling windows and the QoS aggregates.
//! - [`resume`]: repartition by profile, the table stage, restore, what HTTP reads.
//! - [`table`]: the resume-position table (newest event by event time per profile and title).
//! - [`state`]: RocksDB stores, key codec, offsets in the same write batch.
//! - [`pipeline`]: the per-record flow and the checkpoint order.
//! - [`sink`]: the producer, Avro encoding, late and dead-letter copies.
//! - [`metrics`]: every counter and gauge Marquee exports.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, the query API.
//! - [`query`]: parsing and validation of query API requests.
//! - [`gen`]: the synthetic playback-event generator.
//! - [`app`]: builds and runs one instance of a topology.
//! - [`demo`]: the whole job on an in-process Kafka and registry.
//! - [`bench`]: the end-to-end throughput measurement.
//!
//! Without the default `runtime` feature only the pure core is built (`check`, `config`,
//! `decode`, `error`, `query`, `record`, `registry`'s trait and in-memory registry,
//! `state::keys`): what the fuzz targets in `fuzz/` exercise.

#[cfg(feature = "runtime")]
pub mod app;
#[cfg(feature = "runtime")]
pub mod bench;
pub mod check;
pub mod config;
pub mod decode;
#[cfg(feature = "runtime")]
pub mod demo;
pub mod error;
#[cfg(feature = "runtime")]
pub mod gen;
#[cfg(feature = "runtime")]
pub mod http;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod operators;
pub mod query;
pub mod record;
pub mod registry;
#[cfg(feature = "runtime")]
pub mod resume;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod sink;
#[cfg(feature = "runtime")]
pub mod source;
pub mod state;
#[cfg(feature = "runtime")]
pub mod table;
#[cfg(feature = "runtime")]
pub mod watermark;
#[cfg(feature = "runtime")]
pub mod window;
