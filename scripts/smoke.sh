#!/usr/bin/env bash
# Smoke test of the whole pipeline against the real services, as an operator would run it:
# serve, relay, worker and project as separate `spiced` processes on S3 (moto, a fresh prefix),
# a fresh PostgreSQL database and Kafka topics of their own. Sends a few hundred commands
# (a database, a class, instances, updates), waits for every one to complete, reads the read
# model, stops every process with SIGTERM (each must exit 0), runs `spiced verify`, and prints
# a summary. Exits non-zero if anything fails.
#
# Usage: scripts/smoke.sh [COMMANDS]   (default 300)
#   SPICED_BIN=path  use this binary; else target/release/spiced, else target/debug/spiced,
#                    else `cargo build --release` first (CARGO_TARGET_DIR is honoured).
# Idempotent: every run uses new names; services are started if needed and left running.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

COMMANDS="${1:-300}"
(( COMMANDS >= 10 )) || { echo "smoke: COMMANDS must be at least 10" >&2; exit 2; }
INSTANCES=$(( (COMMANDS - 2) * 2 / 3 ))
UPDATES=$(( COMMANDS - 2 - INSTANCES ))
WAIT_SECS=180

say() { echo "smoke: $*" >&2; }
die() { echo "smoke: FAILED: $*" >&2; exit 1; }

find_binary() {
    local target="${CARGO_TARGET_DIR:-target}"
    if [[ -n "${SPICED_BIN:-}" ]]; then echo "$SPICED_BIN"; return; fi
    if [[ -x "$target/release/spiced" ]]; then echo "$target/release/spiced"; return; fi
    if [[ -x "$target/debug/spiced" ]]; then echo "$target/debug/spiced"; return; fi
    say "no spiced binary yet: cargo build --release"
    cargo build --release --locked >&2
    echo "$target/release/spiced"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

BIN="$(find_binary)"
say "binary: $BIN"
say "starting the services (reused when already up)"
eval "$(scripts/services.sh start)"

RUN="smoke_$(date +%s)$RANDOM"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/spiced-$RUN.XXXX")"
CONFIG="$WORK/spiced.toml"
declare -A PIDS=()

cleanup() {
    # Only the processes this script started, by their recorded ids.
    for role in "${!PIDS[@]}"; do
        kill -KILL "${PIDS[$role]}" 2>/dev/null || true
    done
}
trap cleanup EXIT

DB_NAME="spiced_$RUN"
say "fresh PostgreSQL database $DB_NAME, S3 prefix s3://$SPICED_TEST_S3_BUCKET/$RUN, topics ${RUN}_*"
psql -q "$SPICED_TEST_PG_URL" -c "CREATE DATABASE $DB_NAME" >/dev/null
DB_URL="${SPICED_TEST_PG_URL%/*}/$DB_NAME"

API_PORT=$(free_port); OPS_PORT=$(free_port)
RELAY_PORT=$(free_port); WORKER_PORT=$(free_port); PROJECT_PORT=$(free_port)
API="http://127.0.0.1:$API_PORT/api/v1"

cat >"$CONFIG" <<EOF
# Written by scripts/smoke.sh for run $RUN.
[log]
url = "s3://$SPICED_TEST_S3_BUCKET/$RUN"
[log.s3]
endpoint = "$SPICED_TEST_S3_ENDPOINT"
region = "${AWS_REGION:-us-east-1}"
allow_http = true
path_style = true

[serve]
listen = "127.0.0.1:$API_PORT"
ops_listen = "127.0.0.1:$OPS_PORT"

[topics]
ontology_commands = "${RUN}_ontology_commands"
instance_commands = "${RUN}_instance_commands"
ontology_events = "${RUN}_ontology_events"
instance_events = "${RUN}_instance_events"

[kafka]
brokers = "$SPICED_TEST_KAFKA_BROKERS"

[relay]
name = "$RUN"
dead_letter_topic = "${RUN}_relay_dead_letters"

[worker]
group_prefix = "$RUN"
ontology_dead_letter_topic = "${RUN}_ontology_dlq"
instance_dead_letter_topic = "${RUN}_instance_dlq"

[project]
source = "kafka"
group = "$RUN-projection"

[metrics]
relay_listen = "127.0.0.1:$RELAY_PORT"
worker_listen = "127.0.0.1:$WORKER_PORT"
project_listen = "127.0.0.1:$PROJECT_PORT"
EOF
# The database URL carries a password: the environment, not the file.
export SPICED_DATABASE__URL="$DB_URL"

start_role() {
    local role="$1"
    "$BIN" "$role" --config "$CONFIG" >"$WORK/$role.log" 2>&1 &
    PIDS[$role]=$!
}

# Polls (bounded) until the URL answers 200.
wait_ready() {
    local name="$1" url="$2" deadline=$((SECONDS + 60))
    until curl -sf -o /dev/null "$url"; do
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited at start; see $WORK/$name.log"
        (( SECONDS < deadline )) || die "$name not ready at $url after 60 s"
        sleep 0.2
    done
}

# The serve role migrates the fresh database; the others wait for it to be up first.
start_role serve
wait_ready serve "http://127.0.0.1:$OPS_PORT/readyz"
start_role relay
start_role worker
start_role project
wait_ready relay "http://127.0.0.1:$RELAY_PORT/readyz"
wait_ready worker "http://127.0.0.1:$WORKER_PORT/readyz"
wait_ready project "http://127.0.0.1:$PROJECT_PORT/readyz"
say "serve, relay, worker and project are up (logs in $WORK)"

IDS="$WORK/command_ids"
: >"$IDS"
post() { curl -sf -X "$1" "$API$2" -H 'content-type: application/json' -d "$3"; echo; }
export -f post
export API

STARTED=$SECONDS
say "sending $COMMANDS commands: 1 database, 1 class, $INSTANCES instances, $UPDATES updates"
post POST /databases '{"name": "shop"}' | jq -r .command_id >>"$IDS"
post POST /databases/shop/classes '{"id": "Item", "properties": [{"name": "n", "type": "integer"}]}' | jq -r .command_id >>"$IDS"
seq 1 "$INSTANCES" | xargs -P 8 -I{} bash -c \
    'post POST /databases/shop/classes/Item/instances "{\"id\": \"i{}\", \"data\": {\"n\": {}}}"' \
    | jq -r .command_id >>"$IDS"
seq 1 "$UPDATES" | xargs -P 8 -I{} bash -c \
    'post PUT "/databases/shop/classes/Item/instances/i{}?expected_seq=1" "{\"data\": {\"n\": -{}}}"' \
    | jq -r .command_id >>"$IDS"
SENT=$(grep -c . "$IDS")
(( SENT == COMMANDS )) || die "only $SENT of $COMMANDS commands were accepted"

say "waiting for every command to complete (up to ${WAIT_SECS} s)"
COMPLETED=0; FAILED=0
deadline=$((SECONDS + WAIT_SECS))
while read -r id; do
    while :; do
        status=$(curl -sf "$API/commands/$id" | jq -r .status)
        case "$status" in
            COMPLETED) COMPLETED=$((COMPLETED + 1)); break ;;
            FAILED) FAILED=$((FAILED + 1)); say "command $id FAILED"; break ;;
        esac
        (( SECONDS < deadline )) || die "command $id still $status after ${WAIT_SECS} s"
        sleep 0.1
    done
done <"$IDS"
ELAPSED=$((SECONDS - STARTED))

# Every instance, every update applied: the read model's row count and sum of versions.
read_model() {
    local cursor="" page rows=0 versions=0 position=""
    while :; do
        page=$(curl -sf -D "$WORK/headers" "$API/databases/shop/classes/Item/instances?limit=1000${cursor:+&cursor=$cursor}")
        position=$(tr -d '\r' <"$WORK/headers" | awk -F': ' 'tolower($1) == "x-spiced-projection-position" {print $2}')
        rows=$((rows + $(jq '.items | length' <<<"$page")))
        versions=$((versions + $(jq '[.items[].version] | add // 0' <<<"$page")))
        cursor=$(jq -r '.next_cursor // empty' <<<"$page")
        [[ -n "$cursor" ]] || break
    done
    echo "$rows $versions $position"
}
say "waiting for the read model to show every instance and update"
deadline=$((SECONDS + 60))
while read -r ROWS VERSIONS POSITION < <(read_model); (( ROWS != INSTANCES || VERSIONS != INSTANCES + UPDATES )); do
    (( SECONDS < deadline )) || die "read model has $ROWS rows, versions sum $VERSIONS (want $INSTANCES, $((INSTANCES + UPDATES)))"
    sleep 0.2
done

say "stopping every role with SIGTERM"
EXITS=""
for role in serve worker project relay; do
    kill -TERM "${PIDS[$role]}"
    rc=0; wait "${PIDS[$role]}" || rc=$?
    unset "PIDS[$role]"
    EXITS+="$role=$rc "
    (( rc == 0 )) || say "$role exited $rc; see $WORK/$role.log"
done

VERIFY=passed
"$BIN" verify --config "$CONFIG" >"$WORK/verify.txt" 2>&1 || VERIFY=FAILED

cat <<EOF

spiced smoke run $RUN
  commands sent / completed / failed : $SENT / $COMPLETED / $FAILED
  elapsed (send + complete)          : ${ELAPSED} s
  read model rows (instances)        : $ROWS (projection position $POSITION)
  exit codes after SIGTERM           : $EXITS
  spiced verify                      : $VERIFY ($WORK/verify.txt)
  logs                               : $WORK
EOF
[[ "$VERIFY" == passed && "$FAILED" == 0 && "$EXITS" != *=[1-9]* ]] || die "see above"
say "ok"
