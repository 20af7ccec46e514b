#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time from its seed corpus in
# fuzz/corpus/<target> (and topologies/ for the topology target), with AddressSanitizer. Usage: scripts/fuzz.sh [seconds per target, 20]
# A crash fails the run and leaves its input under $FUZZ_OUT (printed); make it a regression
# test before fixing it. Needs the nightly toolchain and cargo-fuzz (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "cargo fuzz needs the nightly toolchain: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (a minute or two)" >&2
  env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked
fi

# Its own target directory: sanitizer builds never invalidate the main build's cache.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/marquee-fuzz-target}"
out="${FUZZ_OUT:-$(mktemp -d -t marquee-fuzz.XXXXXX)}"
cargo +nightly fuzz build -O

for target in $(cargo +nightly fuzz list); do
  # New inputs go to a scratch directory; the checked-in seeds stay as they are.
  mkdir -p "$out/$target"
  echo "fuzzing $target for ${seconds}s" >&2
  seeds=("fuzz/corpus/$target")
  [ "$target" = topology ] && seeds+=(topologies)  # the shipped topologies seed it too
  if ! cargo +nightly fuzz run -O "$target" "$out/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -artifact_prefix="$out/$target-" -print_final_stats=1 \
      >"$out/$target.log" 2>&1; then
    tail -60 "$out/$target.log" >&2
    echo "fuzz target $target failed; the crashing input is in $out (see $out/$target.log)" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^Done" "$out/$target.log" | sed "s/^/$target: /" >&2 || true
done
