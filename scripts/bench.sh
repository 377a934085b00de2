#!/usr/bin/env bash
# Benchmarks spiced (release build) against real services and prints the figures.
#
# Starts the services like scripts/test.sh (and stops what it started), then runs
# `cargo bench`. Tune with SPICED_BENCH_SECS (default 10 s per run) and
# SPICED_BENCH_BACKENDS (default local+postgres,s3+postgres,local+sqlite).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "bench: starting services" >&2
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop || true' EXIT

# The S3 server's pid, so the benchmark can report its CPU share.
moto_pid_file="${SPICED_SERVICES_DIR:-target/services}/moto.pid"
if [[ -f "$moto_pid_file" ]]; then
    export SPICED_BENCH_S3_PID="$(cat "$moto_pid_file")"
else
    export SPICED_BENCH_S3_PID="$(pgrep -f 'moto_server' | head -n1 || true)"
fi

echo "bench: cargo bench (release)" >&2
cargo bench --locked --bench write_path --bench relay --bench pipeline --bench projection "$@"
