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

/// The broker leading an input partition is killed (SIGKILL) while Marquee consumes and the
/// producer writes, and comes back later: leadership moves to a follower, no acknowledged
/// record is lost, and the results equal the reference.
#[test]
fn a_leader_crash_in_the_middle_of_the_stream_changes_no_result() {
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
