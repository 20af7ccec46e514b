//! The resume-position table on Apache Kafka 4.4: the compacted topic and the HTTP API hold the
//! newest position per profile and title despite disorder; a SIGKILLed instance restarted on a
//! wiped state directory restores the same table from the topic; a restart on an existing
//! directory re-emits nothing; completed titles leave the continue-watching row.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::kafka::kafka;
use common::resume::expected_positions as expected;
use common::{free_port, http_get, read_topic, registry, unique, wait_for, wait_ready, KillOnDrop};
use marquee::io::registry::HttpRegistry;
use marquee::record::{PlaybackEvent, ResumePosition};
use marquee::tools::gen::{GenOptions, Generator, Publisher};

fn topology_file(dir: &Path, input: &str, state: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"
name = "{input}"
[source]
topic = "{input}"
[source.kafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[resume]
topic = "{input}-positions"
partitions = 3
emit_interval = "200ms"
[sink]
dead_letter_topic = "{input}-dead"
[state]
dir = "{}"
checkpoint_interval = "100ms"
"#,
        state.display()
    );
    let file = dir.join("resume.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn spawn(file: &Path, http: &str) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "run",
            file.to_str().unwrap(),
            "--brokers",
            &kafka().addr,
            "--registry",
            &registry().url(),
        ])
        .args(["--http", http])
        .env(
            "RUST_LOG",
            std::env::var("MARQUEE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("marquee binary starts");
    KillOnDrop(child)
}

fn get_json(http: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = http_get(http, path);
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Whether every key's HTTP answer and every profile's row match the reference.
fn http_matches(http: &str, expected: &BTreeMap<String, ResumePosition>) -> Result<(), String> {
    let mut rows: BTreeMap<&str, Vec<&ResumePosition>> = BTreeMap::new();
    for (key, want) in expected {
        let (status, got) = get_json(
            http,
            &format!("/profiles/{}/titles/{}", want.profile_id, want.title_id),
        );
        let want_json = serde_json::to_value(want).unwrap();
        if status != 200 || got != want_json {
            return Err(format!("{key}: HTTP {status} {got}, expected {want_json}"));
        }
        if !want.completed {
            rows.entry(&want.profile_id).or_default().push(want);
        }
    }
    for (profile, mut row) in rows {
        row.sort_by(|a, b| {
            b.updated_at
                .cmp(&a.updated_at)
                .then_with(|| a.title_id.cmp(&b.title_id))
        });
        let (status, got) = get_json(
            http,
            &format!("/profiles/{profile}/continue-watching?limit=50"),
        );
        let want = serde_json::to_value(&row).unwrap();
        if status != 200 || got != want {
            return Err(format!(
                "row of {profile}: HTTP {status} {got}, expected {want}"
            ));
        }
    }
    Ok(())
}

/// Latest value per key in the compacted topic (tombstones remove).
fn topic_table(topic: &str, at_least: usize) -> BTreeMap<String, ResumePosition> {
    common::resume::topic_table(&kafka().addr, topic, at_least)
}

/// The value of one unlabelled-or-fully-labelled series in a Prometheus text page.
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics lacks {series}"))
}

/// A topic setting, as the broker describes it.
fn topic_config(topic: &str, name: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka().addr)
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let described = runtime
        .block_on(admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new()))
        .unwrap();
    let resource = described.into_iter().next()?.ok()?;
    resource.get(name).and_then(|entry| entry.value.clone())
}

#[test]
fn resume_table_survives_disorder_sigkill_and_a_wiped_state_directory() {
    let brokers = kafka().addr.clone();
    let input = unique("resume-events");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = topology_file(dir.path(), &input, &state);

    let options = GenOptions {
        seed: 21,
        accounts: 40,
        titles: 8,
        session_interval_ms: 2_000,
        disorder_ms: 20_000,
        late_share: 0.05,
        late_delay_ms: 120_000,
        ..GenOptions::default()
    };
    let mut events: Vec<PlaybackEvent> = Generator::new(options)
        .take(3_000)
        .map(|a| a.event)
        .collect();
    // One title watched to the end: it must leave the continue-watching row.
    let mut finished = events.iter().max_by_key(|e| e.event_time).unwrap().clone();
    finished.event_time += 60_000;
    finished.event_id = "zz-finished".into();
    finished.position_ms = finished.duration_ms.unwrap();
    events.push(finished.clone());
    let expected = expected(&events);
    assert!(
        expected.values().any(|p| p.completed),
        "the dataset has a completed title"
    );
    assert!(expected.len() > 50);

    let http_registry = HttpRegistry::new(&registry().url()).unwrap();
    let publisher = Publisher::new(&brokers, &http_registry, &input, Some(3)).unwrap();
    for e in &events {
        publisher.send(e).unwrap();
    }
    publisher.flush().unwrap();

    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&file, &http);
    wait_for(
        "the HTTP answers to match the reference",
        Duration::from_secs(90),
        || http_matches(&http, &expected).ok(),
    );
    let (status, unknown) = get_json(&http, "/profiles/nobody/continue-watching");
    assert!(status == 200 || status == 421, "{status}");
    if status == 200 {
        assert_eq!(
            unknown,
            serde_json::json!([]),
            "an unknown profile has an empty row"
        );
    }
    assert_eq!(
        get_json(
            &http,
            &format!(
                "/profiles/{}/continue-watching?limit=abc",
                finished.profile_id
            )
        )
        .0,
        400
    );
    assert_eq!(
        get_json(
            &http,
            &format!("/profiles/{}/titles/no-such-title", finished.profile_id)
        )
        .0,
        404
    );
    let topic = format!("{input}-positions");
    wait_for(
        "the compacted topic to match the reference",
        Duration::from_secs(30),
        || (topic_table(&topic, expected.len()) == expected).then_some(()),
    );
    assert_eq!(
        topic_config(&topic, "cleanup.policy").as_deref(),
        Some("compact")
    );
    let (_, metrics) = http_get(&http, "/metrics");
    for needle in [
        "marquee_table_entries",
        "marquee_table_updates_total{outcome=\"applied\"}",
        "marquee_table_updates_total{outcome=\"out_of_date\"}",
        "marquee_query_duration_seconds_bucket{route=\"title\"",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}");
    }
    // The rate limit: far fewer output records than applied updates, the rest suppressed.
    let applied = metric(&metrics, "marquee_table_updates_total{outcome=\"applied\"}");
    let suppressed = metric(&metrics, "marquee_table_emits_suppressed_total");
    let published = topic_len(&topic, 1);
    assert!(
        suppressed > 0.0,
        "updates within the emit interval are coalesced"
    );
    assert!(
        (published as f64) < applied,
        "{published} records for {applied} updates"
    );

    // A new machine: SIGKILL, wipe the state, restart: the table comes back from its changelog.
    child.kill();
    std::fs::remove_dir_all(&state).unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&file, &http);
    wait_ready(&http, Duration::from_secs(60));
    wait_for(
        "the restored table to answer like before",
        Duration::from_secs(30),
        || http_matches(&http, &expected).ok(),
    );
    let (_, metrics) = http_get(&http, "/metrics");
    let restored = metric(&metrics, "marquee_restored_records_total{task=\"resume\"}");
    assert!(
        restored >= expected.len() as f64,
        "the table came back from its changelog ({restored} records for {} keys)",
        expected.len()
    );

    // A restart on the existing directory neither replays nor re-emits the table.
    child.terminate();
    let before = topic_len(&topic, 1);
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = spawn(&file, &http);
    wait_ready(&http, Duration::from_secs(60));
    http_matches(&http, &expected).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let after = topic_len(&topic, before);
    child.terminate();
    assert_eq!(
        after, before,
        "no records re-emitted after a restart on the same state"
    );

    // Retention: an event 100 days newer in one table partition expires that partition's other
    // entries (90 days without an update) with tombstones; other partitions keep theirs.
    let mut future = finished.clone();
    future.title_id = "title-new".into();
    future.event_id = "zz-future".into();
    future.event_time += 100 * 86_400_000;
    publisher.send(&future).unwrap();
    let expiring = marquee::tools::gen::partition_for(&future.profile_id, 3);
    // A client clock 100 days ahead of its Kafka timestamp, in another table partition: the
    // skew guard dead-letters it, so it expires nothing and never becomes an entry.
    let mut rogue = finished.clone();
    rogue.profile_id = (0..)
        .map(|i| format!("rogue-{i}"))
        .find(|p| marquee::tools::gen::partition_for(p, 3) != expiring)
        .unwrap();
    rogue.event_id = "zz-rogue".into();
    rogue.event_time = marquee::runtime::wall_clock_ms() + 100 * 86_400_000;
    publisher.send(&rogue).unwrap();
    publisher.flush().unwrap();
    let rogue_key = format!("{}/{}", rogue.profile_id, rogue.title_id);
    let future_key = format!("{}/{}", future.profile_id, future.title_id);
    let mut child = spawn(&file, &format!("127.0.0.1:{}", free_port()));
    wait_for(
        "the new entry to be published",
        Duration::from_secs(60),
        || {
            topic_table(&topic, 1)
                .contains_key(&future_key)
                .then_some(())
        },
    );
    child.terminate(); // expiry runs at least at every clean shutdown
    let table = topic_table(&topic, 1);
    for (key, position) in &expected {
        let in_expiring = marquee::tools::gen::partition_for(&position.profile_id, 3) == expiring;
        assert_eq!(
            table.contains_key(key),
            !in_expiring,
            "{key}: expired only in partition {expiring}"
        );
    }
    assert!(table.contains_key(&future_key));
    assert!(
        !table.contains_key(&rogue_key),
        "an event from a clock far ahead is dead-lettered, not applied"
    );
}

/// Number of records in `topic` (at least `at_least`, once it stops growing).
fn topic_len(topic: &str, at_least: usize) -> usize {
    read_topic(
        &kafka().addr,
        topic,
        at_least,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .len()
}

/// A restore that cannot read the table's changelog to its end within `restore_timeout` fails
/// the instance (non-zero exit, the reason on stderr) instead of serving a table with entries
/// missing.
#[test]
fn a_restore_that_cannot_finish_fails_the_instance() {
    let brokers = kafka().addr.clone();
    let input = unique("resume-timeout");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = topology_file(dir.path(), &input, &state);
    let http_registry = HttpRegistry::new(&registry().url()).unwrap();
    let publisher = Publisher::new(&brokers, &http_registry, &input, Some(3)).unwrap();
    for a in Generator::new(GenOptions::default()).take(2_000) {
        publisher.send(&a.event).unwrap();
    }
    publisher.flush().unwrap();
    let mut child = spawn(&file, &format!("127.0.0.1:{}", free_port()));
    topic_table(&format!("{input}-positions"), 50);
    child.terminate();

    // A new machine that may take 1 ms to rebuild the table.
    std::fs::remove_dir_all(&state).unwrap();
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "emit_interval = \"200ms\"",
        "emit_interval = \"200ms\"\nrestore_timeout = \"1ms\"",
    );
    std::fs::write(&file, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
        .args(["--registry", &registry().url()])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let status = wait_for("the instance to exit", Duration::from_secs(60), || {
        child.0.try_wait().unwrap()
    });
    assert!(!status.success(), "a failed restore exits non-zero");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("did not finish within 1ms")
            && stderr.contains("raise resume.restore_timeout"),
        "says why and what to change:\n{stderr}"
    );
}
