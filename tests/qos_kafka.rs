//! QoS tests on Apache Kafka itself.

mod common;

use std::time::Duration;

use common::kafka::kafka;
use common::qos::{
    assert_results_equal, dataset, expected, late_event_ids, read_outputs, results_by_key,
    same_result, topology, topology_toml, Feeder,
};
use common::{read_topic, registry, unique, wait_for, wait_for_first_record, KillOnDrop, Running};
use marquee::record::PlaybackEvent;

/// Watermark alignment pauses and resumes partitions many times while a backlog with a hot
/// partition is read; not a record is lost, skipped or counted twice.
#[test]
fn alignment_pauses_and_resumes_without_losing_a_record() {
    common::qos::alignment_scenario(&kafka().addr);
}

/// Sends `events` in order (each partition keeps the dataset's order), numbering from `first`.
fn send(feeder: &Feeder, events: &[(i32, PlaybackEvent)], first: usize) {
    for (i, (p, e)) in events.iter().enumerate() {
        feeder.event(*p, e, first + i);
    }
    feeder.flush();
}

/// The process stops for 40 s (SIGSTOP: no polls, no fetches) in the middle of a backlog, ten
/// idle timeouts long; partitions it could not watch are not idle when it wakes up, so the
/// records are those of an uninterrupted run.
#[test]
fn a_40_second_stall_in_a_backlog_changes_no_record() {
    let brokers = kafka().addr.clone();
    let input = unique("stall-events");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qos.toml");
    // A session that outlives the stall: no rebalance hides what the stall alone does.
    let toml = topology_toml(&input, &dir.path().join("state")).replace(
        "\"session.timeout.ms\" = \"6000\"",
        "\"session.timeout.ms\" = \"60000\"",
    );
    assert!(toml.contains("60000"));
    std::fs::write(&file, toml).unwrap();
    let topology = topology(&input, &dir.path().join("state"));
    let events = dataset(31, 24_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let (first, rest) = events.split_at(events.len() / 2);
    send(&feeder, first, 0);

    let child = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
        .args(["--registry", &registry().url()])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("marquee binary starts");
    let mut child = KillOnDrop(child);
    wait_for_first_record(&brokers, &topology.sink.topic);
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGSTOP) };
    // The rest of the backlog arrives while the process cannot look.
    send(&feeder, rest, first.len());
    std::thread::sleep(Duration::from_secs(40));
    unsafe { libc::kill(child.0.id() as i32, libc::SIGCONT) };

    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    child.terminate();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
}

/// A host crash that lost recent writes leaves an older state directory while Kafka's
/// committed offsets are newer: the instance continues from the offsets in its state (RocksDB
/// is the source of truth), so the results are still complete and exact.
#[test]
fn an_older_state_directory_still_gives_exact_results() {
    let brokers = kafka().addr.clone();
    let input = unique("older-state");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let topology = topology(&input, &state);
    let events = dataset(37, 18_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let thirds: Vec<_> = events.chunks(events.len() / 3).collect();

    send(&feeder, thirds[0], 0);
    let running = Running::start(&topology, &brokers, None);
    wait_for_first_record(&brokers, &topology.sink.topic);
    std::thread::sleep(Duration::from_secs(1));
    running.stop();
    let older = dir.path().join("older");
    copy_dir(&state, &older);

    send(&feeder, thirds[1], thirds[0].len());
    let running = Running::start(&topology, &brokers, None);
    wait_for_first_record(&brokers, &topology.sink.topic);
    std::thread::sleep(Duration::from_secs(3));
    running.stop();

    // The crash: the newer state is lost, the older copy comes back, and Kafka's committed
    // offsets stand at the end of everything read so far.
    commit_end_offsets(&brokers, &topology.group_id(), &input);
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::rename(&older, &state).unwrap();
    send(&feeder, thirds[2], thirds[0].len() + thirds[1].len());
    let running = Running::start(&topology, &brokers, None);
    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(
        late_event_ids(&late),
        expected.late,
        "late records, duplicates allowed"
    );
}

/// Commits the end of every partition of `topic` as `group`'s offsets.
fn commit_end_offsets(brokers: &str, group: &str, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(high))
            .unwrap();
    }
    // A stopped instance stays a static member of the group until its session times out,
    // and the group refuses commits from outside it until then.
    wait_for(
        "the group to accept the commit",
        Duration::from_secs(60),
        || consumer.commit(&tpl, CommitMode::Sync).ok(),
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Output topics take `sink.partitions` when Marquee creates them (the broker's defaults
/// otherwise), even where a metadata request would auto-create them first.
#[test]
fn output_topics_take_the_configured_partitions() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = kafka().addr.clone();
    let input = unique("topic-config");
    common::create_topic(&brokers, &input, 2);
    let dir = tempfile::tempdir().unwrap();
    let mut topology = topology(&input, dir.path());
    topology.sink.partitions = Some(3);
    topology.sink.replication_factor = Some(1);
    let running = Running::start(&topology, &brokers, None);
    let metadata: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for topic in [&topology.sink.topic, &topology.sink.late_topic] {
        wait_for(
            &format!("{topic} with 3 partitions"),
            Duration::from_secs(30),
            || {
                let m = metadata
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()?;
                (m.topics().first()?.partitions().len() == 3).then_some(())
            },
        );
    }
    running.stop();
}

/// 10,000 hostile records (random bytes, wrong magic bytes, fuzzed Avro, absurd numbers,
/// huge strings, clocks far ahead and far behind) mixed into a generated stream, plus good
/// events whose identifiers hold `/` and NUL: the pipeline never stops, every hostile record
/// is dead-lettered with a reason, and the windows, the late topic and the resume table equal
/// the reference over the good records alone.
#[test]
fn hostile_records_change_nothing_and_stop_nothing() {
    use rand::{Rng, SeedableRng};
    let brokers = kafka().addr.clone();
    let input = unique("hostile");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    // Both operators: the windows and the resume table.
    let toml = topology_toml(&input, dir.path()).replace(
        "[sink]",
        &format!("[resume]\ntopic = \"{input}-positions\"\npartitions = 2\nemit_interval = \"100ms\"\n[sink]"),
    );
    let topology = marquee::config::Topology::parse(&toml, std::path::Path::new("t.toml")).unwrap();
    let mut good = dataset(43, 12_000);
    for (i, (_, e)) in good.iter_mut().enumerate().filter(|(i, _)| i % 100 == 7) {
        e.cdn = format!("edge/{}\0x", i % 3);
        e.profile_id = format!("we/ird\0{i}");
    }
    let expected = expected(&good);
    let good_events: Vec<PlaybackEvent> = good.iter().map(|(_, e)| e.clone()).collect();
    let positions = common::resume::expected_positions(&good_events);
    let feeder = Feeder::new(&brokers, &input);
    let mut decoder = marquee::io::decode::Decoder::new(std::sync::Arc::new(
        marquee::io::registry::HttpRegistry::new(&registry().url()).unwrap(),
    ));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(43);
    let now = marquee::runtime::wall_clock_ms();
    let mut hostile = 0;
    for (i, (p, e)) in good.iter().enumerate() {
        feeder.event(*p, e, i);
        if i % 6 != 5 && hostile < 10_000 {
            let mut bad = e.clone();
            bad.event_id = format!("hostile-{i}");
            let value = match i % 7 {
                0 => (0..rng.random_range(0..40)).map(|_| rng.random()).collect(),
                1 => {
                    let mut v = feeder.v1.encode(e).unwrap();
                    v[0] = rng.random_range(1..=255);
                    v
                }
                2 => {
                    let mut v = feeder.v1.encode(e).unwrap();
                    for b in v.iter_mut().skip(5) {
                        if rng.random_bool(0.2) {
                            *b = rng.random();
                        }
                    }
                    v
                }
                3 => {
                    bad.play_ms = rng.random_range(i64::MIN..0);
                    feeder.v1.encode(&bad).unwrap()
                }
                4 => {
                    bad.event_time = now + 86_400_000;
                    feeder.v1.encode(&bad).unwrap()
                }
                5 => {
                    bad.event_time = rng.random_range(i64::MIN..0);
                    feeder.v1.encode(&bad).unwrap()
                }
                _ => {
                    bad.cdn = "c".repeat(if i % 500 == 6 { 100_000 } else { 65 });
                    feeder.v1.encode(&bad).unwrap()
                }
            };
            // Fuzzed bytes can, rarely, still form a valid event: such a record is not hostile.
            let key = e.session_id.as_bytes();
            let accepted = decoder
                .decode(Some(key), Some(&value))
                .unwrap()
                .and_then(|ev| marquee::check::check(&ev, Some(now), 6_000).map(|()| ev));
            if accepted.is_err() {
                feeder.raw(*p, Some(key), Some(&value));
                hostile += 1;
            }
        }
    }
    feeder.flush();
    assert!(hostile >= 9_500, "{hostile} hostile records");

    let running = Running::start(&topology, &brokers, None);
    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    let dead = read_topic(
        &brokers,
        &topology.sink.dead_letter_topic,
        hostile,
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
    let table =
        common::resume::topic_table(&brokers, &format!("{input}-positions"), positions.len());
    let differing: Vec<_> = positions
        .iter()
        .filter(|(k, want)| table.get(*k) != Some(*want))
        .take(3)
        .collect();
    assert!(
        table.len() == positions.len() && differing.is_empty(),
        "resume table: {} keys, {} expected; differing {differing:?}",
        table.len(),
        positions.len()
    );
    // One task decodes the input for the windows and the repartition step alike: each hostile
    // record is dead-lettered exactly once.
    assert_eq!(dead.len(), hostile, "one dead letter per hostile record");
    let offsets: std::collections::BTreeSet<(&str, &str)> = dead
        .iter()
        .map(|r| {
            let source = |h| r.header(h).unwrap();
            (
                source("marquee.source.partition"),
                source("marquee.source.offset"),
            )
        })
        .collect();
    assert_eq!(
        offsets.len(),
        hostile,
        "every hostile record is dead-lettered"
    );
    assert!(dead
        .iter()
        .all(|r| r.header("marquee.reason").is_some_and(|x| !x.is_empty())));
}

/// A result the broker refuses because of the record itself (here: larger than the results
/// topic's `max.message.bytes`) goes to the dead-letter topic with reason `output_refused`;
/// every other result is emitted as usual and the instance keeps running, where it used to
/// fail the same checkpoint after every restart.
#[test]
fn a_result_the_broker_refuses_is_dead_lettered_and_stops_nothing() {
    let brokers = kafka().addr.clone();
    let input = unique("refused");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    // One record per batch, so the broker judges each result on its own size.
    let toml = topology_toml(&input, dir.path())
        .replace("[state]", "[sink.kafka]\n\"batch.size\" = \"1\"\n[state]");
    let topology = marquee::config::Topology::parse(&toml, std::path::Path::new("t.toml")).unwrap();
    // Results of a 62-byte CDN name (within the 64-byte limit on dimension values) take about
    // 270 bytes as a batch; every other result fits in 220.
    let config = marquee::io::sink::producer_config(&brokers, &Default::default());
    marquee::io::sink::ensure_topics(
        &config,
        &[marquee::io::sink::TopicSpec {
            name: &topology.sink.topic,
            partitions: Some(1),
            replication_factor: None,
            configs: &[("max.message.bytes", "220")],
        }],
    )
    .unwrap();
    let mut events = dataset(47, 3_000);
    for (i, (_, e)) in events.iter_mut().enumerate().filter(|(i, _)| i % 50 == 3) {
        e.cdn = format!("{}-{}", "x".repeat(60), i % 3);
    }
    let expected = expected(&events);
    let (refused, fitting): (Vec<_>, Vec<_>) = expected
        .results
        .iter()
        .partition(|(k, _)| k.starts_with("cdn/xxx"));
    assert!(!refused.is_empty() && fitting.len() > 100);
    let feeder = Feeder::new(&brokers, &input);
    send(&feeder, &events, 0);

    let running = Running::start(&topology, &brokers, None);
    let results = read_topic(
        &brokers,
        &topology.sink.topic,
        fitting.len(),
        Duration::from_secs(6),
        Duration::from_secs(120),
    );
    let dead = read_topic(
        &brokers,
        &topology.sink.dead_letter_topic,
        refused.len(),
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    running.stop();
    let fitting: std::collections::BTreeMap<String, _> = fitting
        .into_iter()
        .map(|(k, w)| (k.clone(), w.clone()))
        .collect();
    assert_results_equal(&results_by_key(&results), &fitting);
    let dead_keys: std::collections::BTreeSet<String> = dead.iter().map(|r| r.key_str()).collect();
    let refused_keys: std::collections::BTreeSet<String> =
        refused.iter().map(|(k, _)| (*k).clone()).collect();
    assert_eq!(dead_keys, refused_keys);
    for r in &dead {
        assert_eq!(r.header("marquee.reason"), Some("output_refused"));
        assert_eq!(
            r.header("marquee.output.topic"),
            Some(topology.sink.topic.as_str())
        );
        let window = common::decode_qos(r.value.as_deref().unwrap());
        let want = &expected.results[&r.key_str()];
        assert!(same_result(&window, want), "{window:?} != {want:?}");
    }
}

/// Hopping windows (10 s every 5 s) over a generated stream with disorder and late records
/// equal the reference: every on-time event counts in both of its windows, a late one in
/// neither.
#[test]
fn hopping_windows_equal_the_reference() {
    let brokers = kafka().addr.clone();
    let input = unique("hopping");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(&input, dir.path())
        .replace("window = \"10s\"", "window = \"10s\"\nadvance = \"5s\"");
    let topology = marquee::config::Topology::parse(&toml, std::path::Path::new("t.toml")).unwrap();
    let events = dataset(53, 4_000);
    let rules = common::reference::Rules {
        advance: 5_000,
        ..common::qos::RULES
    };
    let expected = common::qos::expected_with(rules, &events);
    assert!(!expected.late.is_empty());
    let feeder = Feeder::new(&brokers, &input);
    send(&feeder, &events, 0);
    let running = Running::start(&topology, &brokers, None);
    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
    let starts: std::collections::BTreeSet<i64> =
        expected.results.values().map(|w| w.window_start).collect();
    assert!(
        starts.iter().any(|s| s % 10_000 == 5_000),
        "windows start every 5 s"
    );
}

/// The `early` emit policy: while windows are open, updated results marked not final appear
/// every interval; the final results are exactly those of the `final` policy, and no early
/// result of a window follows its final one.
#[test]
fn early_results_come_before_and_never_change_the_final_ones() {
    let brokers = kafka().addr.clone();
    let input = unique("early");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(&input, dir.path()).replace(
        "grace = \"5s\"",
        "grace = \"5s\"\nemit = \"early\"\nearly_interval = \"200ms\"",
    );
    let topology = marquee::config::Topology::parse(&toml, std::path::Path::new("t.toml")).unwrap();
    let events = dataset(59, 3_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let running = Running::start(&topology, &brokers, None);
    // Fed live in slices, so windows stay open across several early intervals.
    for (i, slice) in events.chunks(300).enumerate() {
        send(&feeder, slice, i * 300);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (records, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    running.stop();
    let decoded: Vec<(String, marquee::record::QosWindow)> = records
        .iter()
        .map(|r| (r.key_str(), common::decode_qos(r.value.as_deref().unwrap())))
        .collect();
    let finals: Vec<_> = records
        .iter()
        .zip(&decoded)
        .filter(|(_, (_, w))| w.is_final)
        .map(|(r, _)| r.clone())
        .collect();
    assert_results_equal(&results_by_key(&finals), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
    let early = decoded.iter().filter(|(_, w)| !w.is_final).count();
    assert!(early > 0, "early results were written");
    let mut finished = std::collections::BTreeSet::new();
    for (key, w) in &decoded {
        if w.is_final {
            finished.insert(key.clone());
        } else {
            assert!(
                !finished.contains(key),
                "an early result of {key} followed its final one"
            );
        }
    }
}

/// Generated sessions that cross midnight, with start failures, exits before start, bitrate
/// switches and late records: the QoE fields (attempts, failures, exits, startup percentiles
/// within 1%, bitrate) and DAU, exact and sketched, equal the reference. The day before
/// midnight gets running values while it is open, then its final value; records late for
/// their window still count for their day.
#[test]
fn qoe_fields_and_daily_active_users_equal_the_reference() {
    use common::qos::{dataset_from, per_partition};
    use common::reference::daily;

    let brokers = kafka().addr.clone();
    let input = unique("qoe-dau");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    // 2025-12-31T23:58:30Z: sessions run across midnight.
    let midnight = 1_767_225_600_000;
    let mut events = dataset_from(53, 9_000, midnight - 90_000);
    // A viewer whose only event is late for its window, not for its day.
    let after = events
        .iter()
        .position(|(p, e)| *p == 0 && e.event_time >= midnight + 90_000)
        .unwrap();
    let mut lone = events[after].1.clone();
    lone.event_time -= 40_000;
    lone.event_type = marquee::record::EventType::Heartbeat;
    lone.event_id = "late-only".into();
    lone.session_id = "late-only-session".into();
    lone.account_id = "acc-late-only".into();
    lone.profile_id = "acc-late-only-p0".into();
    events.insert(after + 1, (0, lone));
    let expected = expected(&events);
    assert!(expected.late.contains("late-only"));
    let by_partition = per_partition(&events);
    let want = daily(common::qos::RULES.out_of_orderness, 5_000, &by_partition);
    let all = |k: &str| {
        expected
            .results
            .values()
            .filter_map(|w| match k {
                "failures" => w.video_start_failures,
                "exits" => w.exits_before_video_start,
                _ => w.attempts,
            })
            .sum::<i64>()
    };
    assert!(
        all("failures") > 0 && all("exits") > 0 && all("attempts") > 100,
        "the data exercises every rule"
    );
    assert!(want.values().any(|d| d.is_final) && want.values().any(|d| !d.is_final));

    let instance = |name: &str, counting: &str| {
        let state = dir.path().join(name);
        // Each instance has its own group and output topics.
        let toml = topology_toml(&input, &state)
            .replace(&format!("\"{input}-"), &format!("\"{input}-{name}-"))
            + &format!(
                "[dau]\ntopic = \"{input}-{name}-dau\"\ncounting = \"{counting}\"\ninterval = \"1s\"\ngrace = \"5s\"\n"
            );
        marquee::config::Topology::parse(&toml, std::path::Path::new("dau.toml")).unwrap()
    };
    let exact = instance("exact", "exact");
    let sketch = instance("sketch", "sketch");
    let feeder = Feeder::new(&brokers, &input);
    let split = events
        .iter()
        .position(|(_, e)| e.event_time >= midnight + 20_000)
        .unwrap();
    send(&feeder, &events[..split], 0);
    let runs = [
        Running::start(&exact, &brokers, None),
        Running::start(&sketch, &brokers, None),
    ];
    let dau_topic = |t: &marquee::config::Topology| t.dau.as_ref().unwrap().topic.clone();
    // While the day before midnight is open: running values of it.
    let day_before = format!("all/all/{}", midnight - 86_400_000);
    let running = read_topic(
        &brokers,
        &dau_topic(&exact),
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    assert!(
        running.iter().any(|r| r.key_str() == day_before),
        "a running value of the open day"
    );
    send(&feeder, &events[split..], split);

    let (results, late) = read_outputs(&brokers, &exact, &expected, Duration::from_secs(120));
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
    std::thread::sleep(Duration::from_secs(3));
    let newest = |t: &marquee::config::Topology| {
        common::qos::daily_records(&brokers, &dau_topic(t), want.len())
    };
    let exact_out = newest(&exact);
    let sketch_out = newest(&sketch);
    for r in runs {
        r.stop();
    }
    let got = common::qos::newest_daily(&exact_out);
    assert_eq!(got, want);
    assert!(
        exact_out[&day_before].iter().any(|d| !d.is_final),
        "running values came first"
    );
    for (k, v) in &sketch_out {
        let (d, w) = (v.last().unwrap(), &want[k]);
        assert!(!d.exact && d.is_final == w.is_final, "{k}: {d:?}");
        for (got, want) in [(d.accounts, w.accounts), (d.profiles, w.profiles)] {
            let error = (got as f64 - want as f64).abs() / want as f64;
            assert!(
                error <= 4.0 * marquee::distinct::SKETCH_STANDARD_ERROR,
                "{k}: {got} for {want}"
            );
        }
    }
    assert_eq!(sketch_out.len(), want.len());
    // Records late for their window but on time for their day were counted.
    let mut on_time = by_partition.clone();
    on_time
        .values_mut()
        .for_each(|events| events.retain(|e| !expected.late.contains(&e.event_id)));
    assert_ne!(
        daily(common::qos::RULES.out_of_orderness, 5_000, &on_time),
        want
    );
}

/// Exactly-once: the binary is SIGKILLed twice in the middle of its work and restarted on
/// its state directory; a `read_committed` consumer of the results and late topics sees
/// every record exactly once, equal to the reference — no duplicate from a replay.
#[test]
fn exactly_once_outputs_survive_sigkills_without_a_duplicate() {
    let brokers = kafka().addr.clone();
    let input = unique("eos");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = dir.path().join("eos.toml");
    // Long checkpoints: at-least-once output would be visible (and replayed after the kill)
    // for seconds before the state that stands for it is written.
    let toml = topology_toml(&input, &state).replace(
        "checkpoint_interval = \"200ms\"",
        "checkpoint_interval = \"8s\"",
    ) + "[processing]\nguarantee = \"exactly_once\"\n";
    assert!(toml.contains("\"8s\""));
    std::fs::write(&file, &toml).unwrap();
    let topology = marquee::config::Topology::load(&file).unwrap();
    let events = dataset(71, 18_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let spawn = || {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
            .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
            .args(["--registry", &registry().url()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("marquee binary starts");
        KillOnDrop(child)
    };
    let chunks: Vec<_> = events.chunks(events.len() / 3).collect();
    let mut sent = 0;
    for chunk in &chunks[..2] {
        send(&feeder, chunk, sent);
        sent += chunk.len();
        let mut child = spawn();
        // Killed as soon as outputs are visible: between two checkpoints.
        common::wait_for_first_record(&brokers, &topology.sink.topic);
        child.kill();
    }
    send(&feeder, chunks[2], sent);
    let mut child = spawn();
    common::qos::assert_committed_exactly_once(
        &brokers,
        &topology,
        &expected,
        Duration::from_secs(120),
    );
    child.terminate();
}

/// A crash between the state commit and its transaction leaves an outbox: the next run sends
/// it once (a read_committed reader sees each record once), and an outbox whose transaction
/// did commit (its marker is there) is never sent again.
#[test]
fn an_outbox_left_by_a_crash_is_sent_exactly_once() {
    use marquee::io::sink::Pending;
    use marquee::state::Store;

    let brokers = kafka().addr.clone();
    let input = unique("outbox");
    common::create_topic(&brokers, &input, 3);
    let probe = format!("{input}-probe");
    common::create_topic(&brokers, &probe, 1);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let toml = topology_toml(&input, &state) + "[processing]\nguarantee = \"exactly_once\"\n";
    let topology =
        marquee::config::Topology::parse(&toml, std::path::Path::new("eos.toml")).unwrap();
    let leave_outbox = || {
        let store = Store::open(&state, 8, 8).unwrap();
        let records: Vec<Vec<u8>> = ["a", "b"]
            .iter()
            .map(|k| {
                let pending = Pending {
                    topic: probe.clone(),
                    partition: None,
                    key: Some(k.as_bytes().to_vec()),
                    value: Some(b"from the outbox".to_vec()),
                    timestamp: None,
                    headers: Vec::new(),
                };
                let mut bytes = Vec::new();
                pending.encode(&mut bytes);
                bytes
            })
            .collect();
        let mut batch = marquee::state::Batch::default();
        store.stage_outbox(&mut batch, "input", 5, &records);
        store.commit(batch).unwrap();
    };
    let probe_keys = || {
        let records = common::read_committed(
            &brokers,
            &probe,
            2,
            Duration::from_secs(3),
            Duration::from_secs(60),
        );
        let mut keys: Vec<String> = records.iter().map(|r| r.key_str()).collect();
        keys.sort();
        keys
    };

    leave_outbox();
    let running = Running::start(&topology, &brokers, None);
    assert_eq!(probe_keys(), ["a", "b"], "the outbox is sent once");
    running.stop();

    // The same outbox again, but its transaction committed: the marker says so.
    leave_outbox();
    let running = Running::start(&topology, &brokers, None);
    std::thread::sleep(Duration::from_secs(8));
    running.stop();
    let store = Store::open(&state, 8, 8).unwrap();
    let (number, left) = store.load_outbox("input").unwrap();
    assert!(
        left.is_empty() && number > 5,
        "the outbox was settled ({number}, {} left)",
        left.len()
    );
    drop(store);
    assert_eq!(
        probe_keys(),
        ["a", "b"],
        "a committed outbox is not sent again"
    );
}

/// State moves with its partition: an instance stops in the middle of the stream with
/// windows, sessions and days open, its state directory is wiped, and a new instance in the
/// same group restores every partition from the changelog topics and ends with the results
/// of an uninterrupted run (without the changelogs, the open windows lose their first half).
#[test]
fn a_wiped_state_directory_is_restored_from_the_changelogs() {
    use common::qos::per_partition;
    use common::reference::daily;

    let brokers = kafka().addr.clone();
    let input = unique("changelog");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let events = dataset(83, 12_000);
    let expected = expected(&events);
    let want_days = daily(
        common::qos::RULES.out_of_orderness,
        5_000,
        &per_partition(&events),
    );
    let instance = |name: &str| {
        let toml = topology_toml(&input, &dir.path().join(name))
            + &format!("[dau]\ntopic = \"{input}-dau\"\ninterval = \"1s\"\ngrace = \"5s\"\n");
        marquee::config::Topology::parse(&toml, std::path::Path::new("changelog.toml")).unwrap()
    };
    let first = instance("first");
    let feeder = Feeder::new(&brokers, &input);
    let half = events.len() / 2;
    send(&feeder, &events[..half], 0);
    let running = Running::start(&first, &brokers, None);
    wait_for_first_record(&brokers, &first.sink.topic);
    std::thread::sleep(Duration::from_secs(2));
    running.stop();
    std::fs::remove_dir_all(&first.state.dir).unwrap();

    let http = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let second = instance("second");
    let running = Running::start(&second, &brokers, Some(http));
    send(&feeder, &events[half..], half);
    let (results, late) = read_outputs(&brokers, &second, &expected, Duration::from_secs(120));
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
    std::thread::sleep(Duration::from_secs(3));
    let days = common::qos::daily_records(&brokers, &format!("{input}-dau"), want_days.len());
    let (_, page) = common::http_get(&http.to_string(), "/metrics");
    running.stop();
    assert_eq!(common::qos::newest_daily(&days), want_days);
    let restored: f64 = page
        .lines()
        .filter_map(|l| l.strip_prefix("marquee_restored_records_total{task=\"input\"} "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    assert!(
        restored > 0.0,
        "the second instance restored state from the changelogs:\n{page}"
    );
}

/// Exactly-once trusts local state only where it equals what the transactions committed. A
/// state directory that is ahead of the group's committed offset (a checkpoint written to
/// RocksDB whose transaction never committed, as a crash or a rebalance leaves it) is rebuilt
/// from the changelogs: otherwise the records in between would be skipped and the windows
/// they close would lose them.
#[test]
fn exactly_once_rebuilds_local_state_that_is_ahead_of_the_committed_offsets() {
    use marquee::state::{Batch, PartitionMeta, Store};

    let brokers = kafka().addr.clone();
    let input = unique("ahead");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let toml = topology_toml(&input, &state) + "[processing]\nguarantee = \"exactly_once\"\n";
    let topology =
        marquee::config::Topology::parse(&toml, std::path::Path::new("ahead.toml")).unwrap();
    let events = dataset(89, 6_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let half = events.len() / 2;
    send(&feeder, &events[..half], 0);
    let running = Running::start(&topology, &brokers, None);
    wait_for_first_record(&brokers, &topology.sink.topic);
    std::thread::sleep(Duration::from_secs(2));
    running.stop();

    // A checkpoint that reached RocksDB but whose transaction did not commit: partition 0's
    // local position is 300 records ahead of the committed one.
    let store = Store::open(&state, 8, 8).unwrap();
    let meta = store
        .partition_meta("input", 0)
        .unwrap()
        .expect("partition 0 checkpointed");
    let mut batch = Batch::default();
    let ahead = PartitionMeta {
        next_offset: meta.next_offset + 300,
        ..meta
    };
    store.stage_meta(&mut batch, "input", 0, ahead);
    store.commit(batch).unwrap();
    drop(store);

    let running = Running::start(&topology, &brokers, None);
    send(&feeder, &events[half..], half);
    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
}

/// Standby replicas: with `state.standby_replicas = 1` each of two instances keeps a warm
/// copy of the other's partitions from the changelogs. When one stops, the other takes its
/// partitions over and reads only what its copies lack, not the whole changelog, and the
/// committed results equal the reference with no duplicate.
#[test]
fn a_partition_that_moves_to_its_standby_copy_restores_only_what_the_copy_lacks() {
    use common::metric_sum;

    let brokers = kafka().addr.clone();
    let input = unique("standby");
    common::create_topic(&brokers, &input, 4);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("standby.toml");
    let toml = topology_toml(&input, &dir.path().join("unused")).replace(
        "checkpoint_interval = \"200ms\"",
        "checkpoint_interval = \"200ms\"\nstandby_replicas = 1",
    ) + "[processing]\nguarantee = \"exactly_once\"\n";
    assert!(toml.contains("standby_replicas"));
    std::fs::write(&file, &toml).unwrap();
    let topology = marquee::config::Topology::load(&file).unwrap();
    let events = common::qos::spread(dataset(101, 12_000), 4);
    let expected = expected(&events);
    let http: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let spawn = |n: usize| {
        let state = dir.path().join(format!("instance-{n}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
            .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
            .args(["--registry", &registry().url()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--http", &http[n]])
            .env(
                "RUST_LOG",
                std::env::var("MARQUEE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(common::instance_log(&format!("{input}-{n}")))
            .spawn()
            .expect("marquee binary starts");
        KillOnDrop(child)
    };
    let mut leaving = spawn(0);
    common::wait_ready(&http[0], Duration::from_secs(60));
    let _staying = spawn(1);
    common::wait_ready(&http[1], Duration::from_secs(60));
    let metric = |n: usize, name: &str| {
        let (_, page) = common::http_get(&http[n], "/metrics");
        metric_sum(&page, name, "task=\"input\"")
    };
    // Each instance owns two partitions and keeps a copy of the other two.
    wait_for("standby placement", Duration::from_secs(60), || {
        (0..2)
            .all(|n| metric(n, "marquee_standby_partitions") == 2.0)
            .then_some(())
    });
    let feeder = Feeder::new(&brokers, &input);
    let half = events.len() / 2;
    send(&feeder, &events[..half], 0);
    wait_for_first_record(&brokers, &topology.sink.topic);
    // The copies have applied everything written so far once their count stops growing.
    let mut copied = 0.0;
    wait_for(
        "the standby copies to catch up",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_secs(1));
            let now = metric(1, "marquee_standby_records_total");
            let settled = now > 0.0 && now == copied;
            copied = now;
            settled.then_some(())
        },
    );
    leaving.terminate();
    send(&feeder, &events[half..], half);
    common::qos::assert_committed_exactly_once(
        &brokers,
        &topology,
        &expected,
        Duration::from_secs(120),
    );
    let restored = metric(1, "marquee_restored_records_total");
    assert!(
        restored * 2.0 < copied,
        "the partitions that moved were caught up from their copies ({copied} changelog \
         records copied) by reading only what the copies lacked, not restored whole \
         ({restored} records read)"
    );
}

/// First contact with a fresh cluster, as the README tells it: `gen` creates the topic it
/// writes (with `--partitions`) and delivers every event; `run` on a topology whose input
/// topic does not exist stops at once and names it, rather than reporting ready and waiting
/// for a topic nobody will create.
#[test]
fn gen_creates_its_topic_and_run_names_a_missing_input_topic() {
    let brokers = kafka().addr.clone();
    let topic = unique("first-contact");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "gen",
            "--brokers",
            &brokers,
            "--registry",
            &registry().url(),
        ])
        .args(["--topic", &topic, "--count", "500", "--partitions", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("sent 500 events to {topic}")),
        "{stderr}"
    );
    let client = marquee::io::sink::producer_config(&brokers, &Default::default());
    assert_eq!(
        marquee::io::sink::partitions_of(&client, &topic).unwrap(),
        Some(3)
    );
    let records = read_topic(
        &brokers,
        &topic,
        500,
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    assert_eq!(records.len(), 500);

    let missing = unique("not-created");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("missing.toml");
    std::fs::write(&file, topology_toml(&missing, &dir.path().join("state"))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
        .args(["--registry", &registry().url(), "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("the input topic {missing} does not exist")),
        "{stderr}"
    );
    assert_eq!(
        marquee::io::sink::partitions_of(&client, &missing).unwrap(),
        None,
        "run does not create the input topic"
    );
    assert_eq!(
        marquee::io::sink::partitions_of(&client, &format!("{missing}-qos")).unwrap(),
        None,
        "nor any output topic before it knows the input"
    );
}

/// `marquee status` on a running instance: every input partition with its committed offset,
/// end, lag and owner from the cluster, its watermark from the instance, and the instance
/// ready with its state; as JSON and as a table.
#[test]
fn status_reports_lag_owners_watermarks_and_instances() {
    let brokers = kafka().addr.clone();
    let input = unique("status");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.toml");
    std::fs::write(&file, topology_toml(&input, &dir.path().join("state"))).unwrap();
    let topology = marquee::config::Topology::load(&file).unwrap();
    let events = dataset(107, 3_000);
    let feeder = Feeder::new(&brokers, &input);
    send(&feeder, &events, 0);
    let http = format!("127.0.0.1:{}", common::free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
        .args(["--registry", &registry().url(), "--http", &http])
        .args(["--instance-id", "status-a"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("marquee binary starts");
    let mut child = KillOnDrop(child);
    wait_for_first_record(&brokers, &topology.sink.topic);
    let status = |json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_marquee"));
        command
            .args(["status", file.to_str().unwrap(), "--brokers", &brokers])
            .args(["--instance", &http]);
        if json {
            command.arg("--json");
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Caught up: every record is committed (a checkpoint is 200 ms).
    let report: serde_json::Value = wait_for("a caught-up status", Duration::from_secs(60), || {
        let report: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
        let caught_up = report["partitions"]
            .as_array()?
            .iter()
            .all(|p| p["lag"] == 0 && p["owner"] == "status-a");
        caught_up.then_some(report)
    });
    let table = status(false);
    child.terminate();
    assert!(
        table.contains(&format!("input {input} (3 partitions, 0 records behind)")),
        "{table}"
    );
    assert!(
        table.contains("status-a") && table.contains(&http),
        "{table}"
    );
    assert_eq!(report["topic"], input.as_str());
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    let total: i64 = partitions.iter().map(|p| p["end"].as_i64().unwrap()).sum();
    assert_eq!(total, events.len() as i64, "the ends hold every record");
    for p in &partitions[..2] {
        assert!(p["watermark_ms"].as_i64().unwrap() > 0, "{p}");
    }
    let instance = &report["instances"][0];
    assert_eq!(instance["address"], http.as_str());
    assert_eq!(instance["ready"], true, "{instance}");
    assert!(instance["state_bytes"].as_u64().unwrap() > 0, "{instance}");
}
