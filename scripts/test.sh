#!/usr/bin/env bash
# Installs what the tests need (build dependencies, Apache Kafka, the Tansu broker, promtool,
# Chromium, cargo-fuzz) and runs every check: formatting, clippy, unit, property and
# integration tests on real components, and a bounded run of every fuzz target.
cd "$(dirname "$0")/.."
source scripts/deps.sh

tansu_bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if [ ! -x "$tansu_bin" ] && ! command -v tansu >/dev/null 2>&1; then
  echo "installing the Tansu Kafka broker for the integration tests (several minutes)" >&2
  cargo install tansu --locked --features dynostore
fi

# promtool (Debian's prometheus package) for the alert rule tests, headless Chromium for the
# dashboard test.
packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
  echo "installing ${packages[*]} for the alert rule and dashboard tests" >&2
  apt_install "${packages[@]}"
fi

# Apache Kafka 4.4 for the tests that need the broker users run (jars from Maven Central).
bash scripts/kafka.sh >/dev/null

cargo fmt --check
cargo clippy --release --all-targets --quiet -- -D warnings
# The pure core builds without Kafka, RocksDB and HTTP (what the fuzz targets link).
cargo check --quiet --no-default-features --lib
cargo test --release
# Every fuzz target, 20 s each from the seeds in fuzz/corpus (nightly + cargo-fuzz).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
