//! Marquee: a real-time stream processor for video-streaming playback events.
//!
//! ```text
//!                 ┌──────────────── runtime::Task (one per input topic) ────────────────┐
//! Kafka ─► io::source ─► io::decode ─► check ─► watermark ─► operators ─► io::sink ─► topics
//!          (group, exact   (Avro +     (bad-data  (per        │ qos windows     (results, late,
//!           positions)      registry)   rules)     partition) │ repartition      dead letters,
//!                                                             │ resume table     internal topics)
//!                 └──── checkpoint: flush outputs → one RocksDB batch (every operator's
//!                       state + offsets + watermarks) → commit offsets to Kafka ────────┘
//!
//! input ─► Task[qos windows, repartition] ─► <name>-resume-by-profile ─► Task[resume table]
//!                                                                          │ restore from
//!   serve::http: /metrics · /healthz · /readyz · /profiles/… queries ◄──── state (RocksDB)
//! ```
//!
//! # Layout
//!
//! - [`config`]: topology files, defaults and validation.
//! - [`error`]: typed errors per boundary and the bad-data policy.
//! - [`record`]: the input event and the output records.
//! - [`check`]: the bad-data rules (event-time range, clock skew, numeric ranges, lengths).
//! - [`io`]: the Kafka and Avro edges — [`io::source`] (consumer group, rebalances, exact
//!   positions, pause/resume, offset commits), [`io::decode`] (Confluent framing, Avro with
//!   schema resolution), [`io::registry`] (registry client, in-memory and embedded registries),
//!   [`io::sink`] (the producer, Avro encoding, late and dead-letter copies, refused outputs).
//! - [`runtime`]: the task loop that runs any set of operators over one topic: assignment,
//!   decode once, watermarks and alignment, the checkpoint protocol; the merge task (phase
//!   two) and the standby copies of other instances' partitions.
//! - [`operators`]: what the runtime drives — [`operators::qos`] (QoS windows with the
//!   session lifecycle's QoE fields), [`operators::dau`] (daily active users),
//!   [`operators::repartition`] (by profile), [`operators::table`] (the resume table).
//! - [`watermark`]: per-partition watermarks, idleness, the operator watermark.
//! - [`window`]: tumbling windows and the QoS aggregates.
//! - [`table`]: the resume-position update rule (newest event by event time).
//! - [`daily`] and [`distinct`]: DAU state per day and group, exact or sketched distinct
//!   counts.
//! - [`session`]: the session lifecycle rule behind the QoE fields (attempts, start failures,
//!   exits before start, startup time, bitrate), decided in event-time order.
//! - [`resume`]: what the HTTP side reads of the resume table.
//! - [`progress`]: progress lines of long work (restores, backfills).
//! - [`state`]: RocksDB stores, key codec, offsets in the same write batch.
//! - [`metrics`]: every counter and gauge Marquee exports.
//! - [`serve`]: [`serve::http`] (`/metrics`, `/healthz`, `/readyz`, the query API) and
//!   [`serve::query`] (parsing and validation of query requests).
//! - [`app`]: builds the tasks of a topology and runs them.
//! - [`tools`]: [`tools::gen`] (synthetic playback events), [`tools::demo`] (the whole job on
//!   an in-process Kafka and registry), [`tools::bench`] (end-to-end throughput),
//!   [`tools::status`] (`marquee status`).
//!
//! Without the default `runtime` feature only the pure core is built (`check`, `config`,
//! `error`, `record`, `io::decode`, `io::registry`'s trait and in-memory registry,
//! `progress`, `serve::query`, `state::keys`): what the fuzz targets in `fuzz/` exercise.

#[cfg(feature = "runtime")]
pub mod app;
pub mod check;
pub mod config;
#[cfg(feature = "runtime")]
pub mod daily;
#[cfg(feature = "runtime")]
pub mod distinct;
pub mod error;
pub mod io;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod operators;
pub mod progress;
pub mod record;
#[cfg(feature = "runtime")]
pub mod resume;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod serve;
pub mod session;
pub mod state;
#[cfg(feature = "runtime")]
pub mod table;
#[cfg(feature = "runtime")]
pub mod tools;
#[cfg(feature = "runtime")]
pub mod watermark;
#[cfg(feature = "runtime")]
pub mod window;
