//! The QoS pipeline on librdkafka's in-process mock cluster: a fast end-to-end check of the
//! same reference equality as the broker tests (the mock keeps ~5 MiB per partition, so the
//! dataset is small).

mod common;

use std::time::Duration;

use common::qos::{
    assert_results_equal, dataset, expected, read_outputs, results_by_key, topology, Feeder,
};
use common::{unique, Running};
use rdkafka::mocking::MockCluster;

#[test]
fn pipeline_on_the_mock_cluster_matches_the_reference() {
    let kafka = MockCluster::new(1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let input = unique("mock-events");
    kafka.create_topic(&input, 3, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let topology = topology(&input, state.path());
    for t in [
        &topology.sink.topic,
        &topology.sink.late_topic,
        &topology.sink.dead_letter_topic,
    ] {
        kafka.create_topic(t, 1, 1).unwrap();
    }
    let events = dataset(3, 3_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    for (i, (p, e)) in events.iter().enumerate() {
        feeder.event(*p, e, i);
    }
    feeder.flush();

    let running = Running::start(&topology, &brokers, None);
    let (results, _) = read_outputs(&brokers, &topology, &expected, Duration::from_secs(90));
    running.stop();
    assert_results_equal(&results_by_key(&results), &expected.results);
}
