#!/usr/bin/env bash
# Runs the QoS job on an in-process Kafka and schema registry: nothing to install but Rust.
cd "$(dirname "$0")/.."
source scripts/deps.sh
exec cargo run --release --quiet -- demo "$@"
