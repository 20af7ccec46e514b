//! The QoS pipeline on librdkafka's in-process mock cluster: a fast end-to-end check of the
//! same reference equality as the broker tests (the mock keeps ~5 MiB per partition, so the
//! dataset is small).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::qos::{assert_results_equal, dataset, expected, results_by_key, topology, Feeder};
use common::{read_topic, registry, unique};
use marquee::app::{self, Endpoints};
use marquee::http::Health;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

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

    let shutdown = CancellationToken::new();
    let endpoints = Endpoints {
        brokers: brokers.clone(),
        registry: registry().url(),
        http: None,
    };
    let run = {
        let (topology, shutdown) = (topology.clone(), shutdown.clone());
        std::thread::spawn(move || {
            app::run(
                &topology,
                &endpoints,
                &shutdown,
                Arc::new(Health::default()),
                None,
            )
        })
    };
    let results = read_topic(
        &brokers,
        &topology.sink.topic,
        expected.results.len(),
        Duration::from_secs(6),
        Duration::from_secs(90),
    );
    shutdown.cancel();
    run.join().unwrap().expect("pipeline stops cleanly");
    assert_results_equal(&results_by_key(&results), &expected.results);
}
