//! QoS tests on Apache Kafka itself.

mod common;

use common::kafka::kafka;

/// Watermark alignment pauses and resumes partitions many times while a backlog with a hot
/// partition is read; not a record is lost, skipped or counted twice.
#[test]
fn alignment_pauses_and_resumes_without_losing_a_record() {
    common::qos::alignment_scenario(&kafka().addr);
}
