#!/usr/bin/env bash
# Benchmarks spiced (release build) against real services and prints the figures.
#
# Starts the services like scripts/test.sh (and stops what it started; each bench drops the
# PostgreSQL databases it created), then runs
# `cargo bench`. Tune with SPICED_BENCH_SECS (default 10 s per run) and
# SPICED_BENCH_BACKENDS (default local+postgres,s3+postgres,local+sqlite); the write-path
# bench compares writer protocols side by side with SPICED_BENCH_MAX_IN_FLIGHT (default 1, the
# serial commit; e.g. 1,4 adds the pipelined commit with 4 batches in flight on PostgreSQL),
# with SPICED_BENCH_SYNC_INDEX_COMMIT (default false; false,true adds runs whose index commits
# wait for the WAL flush), and runs the workloads of SPICED_BENCH_WORKLOADS (default
# distinct,instances,hot).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "bench: starting services" >&2
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop || true' EXIT

# The S3 server's pid, if this script started it, so the benchmarks can report its CPU share.
moto_pid_file="${SPICED_SERVICES_DIR:-target/services}/moto.pid"
if [[ -f "$moto_pid_file" ]]; then
    export SPICED_BENCH_S3_PID="$(cat "$moto_pid_file")"
fi

# Tansu's too (the pipeline benchmark attributes CPU by the run's own pids, not by name).
tansu_pid_file="${SPICED_SERVICES_DIR:-target/services}/tansu.pid"
if [[ -f "$tansu_pid_file" ]]; then
    export SPICED_BENCH_KAFKA_PID="$(cat "$tansu_pid_file")"
fi

echo "bench: cargo bench (release)" >&2
cargo bench --locked --bench write_path --bench relay --bench pipeline --bench projection "$@"
