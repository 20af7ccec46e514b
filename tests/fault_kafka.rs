//! Fault tests on a three-node Apache Kafka cluster (replication factor 3,
//! `min.insync.replicas=2`): a broker crash in the middle of the stream changes no result.

mod common;

use std::time::Duration;

use common::kafka::Cluster;
use common::qos::{
    assert_results_equal, dataset, expected, late_event_ids, read_outputs, results_by_key,
    topology, Feeder,
};
use common::{unique, wait_for_first_record, Running};

/// One three-node cluster at a time: two of them and their instances on a 2-core machine
/// slow each other past the tests' deadlines.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The broker leading an input partition is killed (SIGKILL) while Marquee consumes and the
/// producer writes, and comes back later: leadership moves to a follower, no acknowledged
/// record is lost, and the results equal the reference.
#[test]
fn a_leader_crash_in_the_middle_of_the_stream_changes_no_result() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start();
    let brokers = cluster.bootstrap.clone();
    let input = unique("failover");
    common::create_topic(&brokers, &input, 3);
    let dir = tempfile::tempdir().unwrap();
    let topology = topology(&input, dir.path());
    let events = dataset(61, 12_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    let (first, rest) = events.split_at(events.len() / 2);
    for (i, (p, e)) in first.iter().enumerate() {
        feeder.event(*p, e, i);
    }
    feeder.flush();

    let running = Running::start(&topology, &brokers, None);
    wait_for_first_record(&brokers, &topology.sink.topic);
    let leader = cluster.leader(&input, 0);
    cluster.kill(leader);
    common::wait_for("a follower to lead", Duration::from_secs(30), || {
        (cluster.leader(&input, 0) != leader).then_some(())
    });
    for (i, (p, e)) in rest.iter().enumerate() {
        feeder.event(*p, e, first.len() + i);
    }
    feeder.flush();
    std::thread::sleep(Duration::from_secs(3));
    cluster.restart(leader);

    let (results, late) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(120));
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
    assert_eq!(late_event_ids(&late), expected.late);
}

/// Many instances, exact results, exactly once. Three `marquee run` processes of the QoS and
/// resume topology, with a standby copy of each partition, share one group over a
/// six-partition input on the three-node cluster while the stream is written: one random
/// instance is SIGKILLed and restarted on its state directory ten times, a fourth instance joins, one leaves for good, and a broker is
/// restarted. The `read_committed` view of the results and late topics equals the
/// single-instance reference, record for record, with no duplicate; the resume topic's
/// committed table and the owners' HTTP answers equal the reference table, and the newest
/// committed DAU values count every instance's accounts and profiles.
#[test]
fn instances_that_crash_join_and_leave_give_the_reference_results_exactly_once() {
    use common::{registry, KillOnDrop};
    use std::process::Command;

    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start();
    let brokers = cluster.bootstrap.clone();
    let input = unique("chaos");
    common::create_topic(&brokers, &input, 6);
    let dir = tempfile::tempdir().unwrap();
    let events = common::qos::spread(dataset(97, 24_000), 6);
    let expected = expected(&events);
    let want_days = common::reference::daily(
        common::qos::RULES.out_of_orderness,
        5_000,
        &common::qos::per_partition(&events),
    );
    let file = dir.path().join("chaos.toml");
    // Standby copies too: partitions that move land on a copy or are restored whole.
    let toml = common::qos::many_instances_toml(&input, "1s").replace(
        "checkpoint_interval = \"1s\"",
        "checkpoint_interval = \"1s\"\nstandby_replicas = 1",
    ) + "[processing]\nguarantee = \"exactly_once\"\n[sink.kafka]\n\"transaction.timeout.ms\" = \"15000\"\n";
    assert!(toml.contains("standby_replicas"));
    std::fs::write(&file, &toml).unwrap();
    let topology = marquee::config::Topology::load(&file).unwrap();
    let http: Vec<String> = (0..4)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let spawn = |n: usize| {
        let state = dir.path().join(format!("instance-{n}"));
        let child = Command::new(env!("CARGO_BIN_EXE_marquee"))
            .args(["run", file.to_str().unwrap(), "--brokers", &brokers])
            .args(["--registry", &registry().url()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--instance-id", &format!("chaos-{n}")])
            .args(["--http", &http[n]])
            .env(
                "RUST_LOG",
                std::env::var("MARQUEE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(common::instance_log(&format!("chaos-{n}")))
            .spawn()
            .expect("marquee binary starts");
        KillOnDrop(child)
    };
    // A supervisor's restart policy: an instance that exited on its own comes back.
    let restart_exited = |instances: &mut Vec<Option<KillOnDrop>>| {
        for (n, slot) in instances.iter_mut().enumerate() {
            if let Some(child) = slot.as_mut() {
                if let Ok(Some(status)) = child.0.try_wait() {
                    eprintln!("instance {n} exited ({status}); restarting it");
                    *slot = Some(spawn(n));
                }
            }
        }
    };
    let mut instances: Vec<Option<KillOnDrop>> = (0..3).map(|n| Some(spawn(n))).collect();
    let feeder = Feeder::new(&brokers, &input);
    let chunks: Vec<_> = events.chunks(events.len() / 12 + 1).collect();
    let mut sent = 0;
    let mut random = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random % n
    };
    for (round, chunk) in chunks.iter().enumerate() {
        for (i, (p, e)) in chunk.iter().enumerate() {
            feeder.event(*p, e, sent + i);
        }
        feeder.flush();
        sent += chunk.len();
        std::thread::sleep(Duration::from_millis(500 + next(2_000)));
        match round {
            // A fourth instance joins.
            4 => instances.push(Some(spawn(3))),
            // One leaves for good.
            7 => instances[1].take().unwrap().terminate(),
            // A broker restarts: leadership moves and comes back.
            9 => {
                let leader = cluster.leader(&input, 0);
                cluster.kill(leader);
                std::thread::sleep(Duration::from_secs(3));
                cluster.restart(leader);
            }
            _ => {}
        }
        restart_exited(&mut instances);
        if round < 10 {
            // SIGKILL a random running instance at a random moment, restart it on its state.
            let alive: Vec<usize> = (0..instances.len())
                .filter(|&n| instances[n].is_some())
                .collect();
            let n = alive[next(alive.len() as u64) as usize];
            instances[n].as_mut().unwrap().kill();
            std::thread::sleep(Duration::from_millis(next(1_500)));
            instances[n] = Some(spawn(n));
        }
    }
    let results = common::qos::committed_results(
        &brokers,
        &topology.sink.topic,
        expected.results.len(),
        Duration::from_secs(240),
    );
    // Anything still in flight would show up as a duplicate now.
    std::thread::sleep(Duration::from_secs(5));
    let results_again = common::read_committed(
        &brokers,
        &topology.sink.topic,
        usize::MAX,
        Duration::from_secs(3),
        Duration::from_secs(20),
    );
    let late = common::read_committed(
        &brokers,
        &topology.sink.late_topic,
        usize::MAX,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    restart_exited(&mut instances);
    let table: Vec<_> = events.iter().map(|(_, e)| e.clone()).collect();
    let table = common::resume::expected_positions(&table);
    let live: Vec<String> = (0..instances.len())
        .filter(|&n| instances[n].is_some())
        .map(|n| http[n].clone())
        .collect();
    // Partitions settle on the instances left; until then some answer 503 or 421.
    common::wait_until_ok("every owner's answers", Duration::from_secs(90), || {
        restart_exited(&mut instances);
        common::resume::owners_answer(&live, &table)
    });
    let positions = common::resume::topic_table(&brokers, &format!("{input}-positions"), 1);
    let days = common::qos::daily_records(&brokers, &format!("{input}-dau"), want_days.len());
    drop(instances);
    assert_results_equal(&results_by_key(&results), &expected.results);
    common::qos::assert_exactly_once(&results_again, &late, &expected);
    assert_eq!(
        positions, table,
        "the committed resume topic holds the reference table"
    );
    assert_eq!(
        common::qos::newest_daily(&days),
        want_days,
        "DAU over every instance's partitions"
    );
}
