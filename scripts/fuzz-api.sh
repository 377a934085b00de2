#!/usr/bin/env bash
# Hostile input against a real `spiced serve`: schemathesis generates requests, valid and
# invalid, from the served /api/v1/openapi.json and checks that none gets a 5xx and that every
# answer matches the document. Then serve stops and `spiced verify` must find the log and the
# index it left consistent.
#
# Needs PostgreSQL and the S3 server of scripts/services.sh (run `scripts/services.sh start`
# first; scripts/test.sh does). Storage is fresh: a new PostgreSQL database and S3 prefix.
# Installs schemathesis into the services' venv. Extra arguments go to `st run`, e.g.
# `scripts/fuzz-api.sh --seed 42`. SPICED_TEST_FUZZ_MAX_EXAMPLES bounds the cases per operation.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES="${SPICED_TEST_FUZZ_MAX_EXAMPLES:-100}"
SERVICES_DIR="${SPICED_SERVICES_DIR:-$PWD/target/services}"
VENV="$SERVICES_DIR/venv"
BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/spiced"
CHECKS=not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance,negative_data_rejection

say() { echo "fuzz-api: $*" >&2; }
die() { echo "fuzz-api: FAILED: $*" >&2; exit 1; }

[[ -f "$SERVICES_DIR/env" ]] || die "no $SERVICES_DIR/env: run scripts/services.sh start first"
# shellcheck disable=SC1091 # written by scripts/services.sh
source "$SERVICES_DIR/env"

install_schemathesis() {
    # services.sh makes the venv when it starts moto; not when moto was already running.
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv $VENV"
    fi
    if "$VENV/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('schemathesis') != '$SCHEMATHESIS_VERSION')" 2>/dev/null; then
        return 0
    fi
    say "pip install schemathesis==$SCHEMATHESIS_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2 \
        || die "pip install schemathesis==$SCHEMATHESIS_VERSION"
}

free_port() {
    "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The configuration of this run: fresh storage, one admin token.
write_config() {
    cat >"$CONFIG" <<EOF
[log]
url = "s3://$SPICED_TEST_S3_BUCKET/fuzz-$RUN"

[log.s3]
endpoint = "$SPICED_TEST_S3_ENDPOINT"
allow_http = true
path_style = true

[database]
url = "$DB_URL"

[serve]
listen = "127.0.0.1:$PORT"

[[auth.tokens]]
name = "fuzz"
scope = "admin"
token = "$TOKEN"
EOF
    chmod 600 "$CONFIG"
}

# Polls /readyz until it answers 200, while serve is alive (30 s at most).
wait_ready() {
    local i
    for ((i = 0; i < 60; i++)); do
        curl -fsS -o /dev/null --max-time 2 "$BASE/readyz" 2>/dev/null && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || { tail -n 40 "$WORK/serve.log" >&2; die "spiced serve exited"; }
        sleep 0.5
    done
    tail -n 40 "$WORK/serve.log" >&2
    die "spiced serve not ready on $BASE after 30 s"
}

# SIGTERM, then waits for a clean exit.
stop_serve() {
    local pid="$SERVE_PID" rc=0
    SERVE_PID=""
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    [[ $rc -eq 0 ]] || { tail -n 40 "$WORK/serve.log" >&2; die "spiced serve exited with $rc on SIGTERM"; }
}

cleanup() {
    if [[ -n "${SERVE_PID:-}" ]]; then
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

install_schemathesis
say "cargo build --locked --bin spiced"
cargo build --locked --bin spiced
[[ -x "$BIN" ]] || die "no binary at $BIN"

RUN="$(date +%s)-$$"
WORK="$SERVICES_DIR/fuzz-api/$RUN"
mkdir -p "$WORK"
CONFIG="$WORK/spiced.toml"
DB_NAME="spiced_fuzz_${RUN//-/_}"
DB_URL="$("$VENV/bin/python" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); \
print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$SPICED_TEST_PG_URL" "$DB_NAME")"
PORT="$(free_port)"
BASE="http://127.0.0.1:$PORT"
TOKEN="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))')"

psql -X -q -v ON_ERROR_STOP=1 "$SPICED_TEST_PG_URL" -c "CREATE DATABASE $DB_NAME" \
    || die "cannot create database $DB_NAME"
write_config
say "spiced serve on $BASE, database $DB_NAME, log prefix fuzz-$RUN (files in $WORK)"
"$BIN" serve --config "$CONFIG" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
wait_ready

say "schemathesis $SCHEMATHESIS_VERSION: checks $CHECKS, at most $MAX_EXAMPLES cases per operation"
started=$SECONDS
# From $WORK, where schemathesis keeps its cache of crashes.
(cd "$WORK" && "$VENV/bin/st" run "$BASE/api/v1/openapi.json" \
    --url "$BASE" \
    --header "Authorization: Bearer $TOKEN" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --workers 1 \
    --request-timeout 30 \
    --no-color \
    --report junit --report-dir "$WORK/report" \
    "$@") \
    || { tail -n 40 "$WORK/serve.log" >&2; die "schemathesis found failures (report in $WORK/report)"; }
say "schemathesis passed in $((SECONDS - started)) s"

stop_serve
say "spiced verify"
"$BIN" verify --config "$CONFIG" || die "spiced verify found the log or the index inconsistent"

psql -X -q "$SPICED_TEST_PG_URL" -c "DROP DATABASE $DB_NAME" || say "could not drop $DB_NAME (left behind)"
rm -rf "$WORK"
echo "fuzz-api: 2 passed, 0 failed"
