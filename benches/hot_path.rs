//! The per-record hot path: Avro decoding, each operator's update path (tumbling and hopping
//! windows, the session lifecycle, DAU exact and sketched, the resume table's rule), and a
//! checkpoint of window state.

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use marquee::config::Dimension;
use marquee::daily::DayPartial;
use marquee::io::decode::{Decoder, PLAYBACK_EVENT_SCHEMA};
use marquee::io::registry::MemoryRegistry;
use marquee::io::sink::AvroEncoder;
use marquee::record::PlaybackEvent;
use marquee::session::Session;
use marquee::state::Store;
use marquee::table::{apply, Applied, Entry};
use marquee::tools::gen::{GenOptions, Generator};
use marquee::window::{PartitionWindows, WindowSpec};

const N: usize = 10_000;
const DIMS: [Dimension; 3] = [Dimension::Cdn, Dimension::Country, Dimension::DeviceType];

fn events() -> Vec<PlaybackEvent> {
    Generator::new(GenOptions::default())
        .take(N)
        .map(|a| a.event)
        .collect()
}

fn decode(c: &mut Criterion) {
    let registry = Arc::new(MemoryRegistry::default());
    let encoder =
        AvroEncoder::register(registry.as_ref(), "events-value", PLAYBACK_EVENT_SCHEMA).unwrap();
    let values: Vec<(Vec<u8>, Vec<u8>)> = events()
        .iter()
        .map(|e| {
            (
                e.session_id.clone().into_bytes(),
                encoder.encode(e).unwrap(),
            )
        })
        .collect();
    let mut decoder = Decoder::new(registry);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(N as u64));
    // As the runtime does: into one event whose buffers are reused.
    let mut event = PlaybackEvent::default();
    group.bench_function("confluent_avro_playback_event", |b| {
        b.iter(|| {
            for (key, value) in &values {
                decoder
                    .decode_into(Some(key), Some(value), &mut event)
                    .unwrap()
                    .unwrap();
                std::hint::black_box(&event);
            }
        })
    });
    group.finish();
}

fn window_update(c: &mut Criterion) {
    let events = events();
    let spec = WindowSpec::tumbling(60_000, 30_000);
    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(N as u64));
    let hopping = WindowSpec {
        size: 300_000,
        advance: 60_000,
        grace: 30_000,
    };
    for (name, spec) in [
        ("add_4_groups", spec),
        ("add_4_groups_hopping_5m_every_1m", hopping),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                PartitionWindows::default,
                |mut windows| {
                    for e in &events {
                        windows.add(&spec, &DIMS, e);
                    }
                    windows
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn table_update(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("table");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("apply_newest_by_event_time", |b| {
        b.iter_batched(
            std::collections::HashMap::<String, Entry>::new,
            |mut table| {
                for e in &events {
                    let key = marquee::table::key_of(e);
                    if let Applied::Updated(entry) = apply(table.get(&key), e, 0.95) {
                        table.insert(key, entry);
                    }
                }
                table
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn flush(c: &mut Criterion) {
    let events = events();
    let spec = WindowSpec::tumbling(60_000, 30_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64, 64).unwrap();
    let mut group = c.benchmark_group("state");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("checkpoint_after_10k_events", |b| {
        b.iter_batched(
            || {
                let mut windows = PartitionWindows::default();
                for e in &events {
                    windows.add(&spec, &DIMS, e);
                }
                windows
            },
            |mut windows| {
                let mut batch = marquee::state::Batch::default();
                store.stage_windows(&mut batch, 0, &mut windows);
                store.commit(batch).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The session lifecycle: each event observed in its session, then every fact decided and
/// added to its windows (as the QoS operator does when a window closes).
fn session_update(c: &mut Criterion) {
    let events = events();
    let spec = WindowSpec::tumbling(60_000, 30_000);
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("observe_and_decide", |b| {
        b.iter_batched(
            || {
                (
                    HashMap::<String, Session>::new(),
                    PartitionWindows::default(),
                )
            },
            |(mut sessions, mut windows)| {
                let mut add = |t, d: &_, f| windows.add_fact(&spec, &DIMS, i64::MIN, (t, d, f));
                for e in &events {
                    let session = match sessions.get_mut(&e.session_id) {
                        Some(s) => s,
                        None => sessions.entry(e.session_id.clone()).or_default(),
                    };
                    session.observe(e, 1_800_000, &mut add);
                }
                for session in sessions.values_mut() {
                    session.decide(i64::MAX, spec.advance, &mut add);
                }
                windows
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// DAU: each event's account and profile into its day's `all`, country and device groups.
fn dau_update(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("dau");
    group.throughput(Throughput::Elements(N as u64));
    for (name, exact) in [("add_exact", true), ("add_sketch", false)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                DayPartial::default,
                |mut day| {
                    for e in &events {
                        day.add(e, exact);
                    }
                    day
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decode,
    window_update,
    session_update,
    dau_update,
    table_update,
    flush
);
criterion_main!(benches);
