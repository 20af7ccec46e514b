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

/// A transaction aborted because its records timed out (a slow broker) fails only itself: the
/// next checkpoint's flush and transaction succeed (the aborted records are sent again then).
#[test]
fn a_transaction_whose_records_timed_out_does_not_fail_the_next_checkpoint() {
    use marquee::io::sink::{producer_config, Pending, Sink};
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let kafka = MockCluster::new(1).unwrap();
    let brokers = kafka.bootstrap_servers();
    kafka.create_topic("slow-out", 1, 1).unwrap();
    let overrides = [
        ("message.timeout.ms", "300"),
        ("transaction.timeout.ms", "10000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sink = Sink::transactional(
        &producer_config(&brokers, &overrides),
        "slow-dead-letters",
        "slow-in",
        "slow-tx",
    )
    .unwrap();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "slow-group")
        .create()
        .unwrap();
    let group = consumer.group_metadata().unwrap();
    let record = Pending {
        topic: "slow-out".into(),
        partition: Some(0),
        key: Some(b"k".to_vec()),
        value: Some(b"v".to_vec()),
        timestamp: None,
        headers: Vec::new(),
    };
    let none = rdkafka::TopicPartitionList::new();
    kafka
        .broker_round_trip_time(1, Duration::from_secs(2))
        .unwrap();
    let aborted = sink
        .publish(std::slice::from_ref(&record), None, &none, &group)
        .unwrap_err();
    assert!(aborted.is_retriable_transaction(), "{aborted}");
    kafka.broker_round_trip_time(1, Duration::ZERO).unwrap();
    sink.flush()
        .expect("nothing of the aborted transaction is owed by the next flush");
    sink.publish(&[record], None, &none, &group)
        .expect("the next transaction commits");
}

/// A transaction that a rebalance aborts (here the group's generation is refused when the
/// offsets are sent) is taken up again from the committed positions: the consumer had read
/// on past them, and the records of the aborted checkpoint must be processed again, not
/// skipped. The first checkpoints abort, so the partitions have no position yet and start
/// over from the beginning.
#[test]
fn the_records_of_an_aborted_transaction_are_processed_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let kafka = MockCluster::new(1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let input = unique("mock-abort");
    kafka.create_topic(&input, 3, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let toml = common::qos::topology_toml(&input, state.path())
        + "[processing]\nguarantee = \"exactly_once\"\n";
    let topology =
        marquee::config::Topology::parse(&toml, std::path::Path::new("abort.toml")).unwrap();
    let events = dataset(5, 3_000);
    let expected = expected(&events);
    let feeder = Feeder::new(&brokers, &input);
    for (i, (p, e)) in events.iter().enumerate() {
        feeder.event(*p, e, i);
    }
    feeder.flush();
    let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION;
    kafka.request_errors(RDKafkaApiKey::TxnOffsetCommit, &[refused; 2]);

    let running = Running::start(&topology, &brokers, None);
    common::qos::assert_committed_exactly_once(
        &brokers,
        &topology,
        &expected,
        Duration::from_secs(90),
    );
    running.stop();
}
