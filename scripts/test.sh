#!/usr/bin/env bash
# Runs spiced's whole test suite against real services.
#
# Starts PostgreSQL, an S3-compatible server (moto) and a Kafka-protocol broker (tansu) on
# 127.0.0.1 if they are not already running (scripts/services.sh), runs every test with
# `cargo test`, then (for the whole suite only) runs the write-side suites again with the
# pipelined commit, checks the Prometheus rules with promtool
# (scripts/promtool.sh), runs the console's browser tests (scripts/console-test.sh: Chromium,
# screenshots in target/console-screenshots/), checks that the benchmarks compile and runs
# scripts/fuzz-api.sh: schemathesis against a real
# `spiced serve`. Stops whatever it started, pass or fail. Extra arguments go to cargo test and
# skip the fuzzing, e.g. `scripts/test.sh --test write_path`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null; then
    echo "test: cargo is not on PATH; install Rust (rustup) first" >&2
    exit 1
fi

echo "test: starting services" >&2
eval "$(scripts/services.sh start)"
trap 'echo "test: stopping services this run started" >&2; scripts/services.sh stop || true' EXIT

echo "test: cargo test" >&2
cargo test --locked "$@"

if [[ $# -eq 0 ]]; then
    # The write side again with the pipelined commit (writer.max_in_flight above 1; serial is
    # the default): the same guarantees, checked by the same suites (PostgreSQL; SQLite always
    # writes serially).
    echo "test: write-side suites with the pipelined commit" >&2
    SPICED_TEST_MAX_IN_FLIGHT=4 cargo test --locked --test write_path --test log_order --test verify \
        --test full_pipeline --test workers
    # The alert rules and the scrape configuration of deploy/prometheus: syntax, then the
    # rules' unit tests on synthetic series.
    echo "test: promtool (deploy/prometheus)" >&2
    promtool="$(scripts/promtool.sh)"
    "$promtool" check config deploy/prometheus/prometheus.yml
    (cd deploy/prometheus && "$promtool" test rules alerts.test.yml)
    # The console in a real browser (Chromium, installed if missing): every page against
    # spiced dev (a dead letter's re-drive included), and the re-drive through Kafka against
    # serve, relay and worker processes.
    echo "test: scripts/console-test.sh" >&2
    scripts/console-test.sh target/debug/spiced
    # The benchmarks are not run here (scripts/bench.sh does), but they must keep compiling.
    echo "test: cargo check --benches" >&2
    cargo check --locked --benches
    echo "test: scripts/fuzz-api.sh" >&2
    scripts/fuzz-api.sh
fi
