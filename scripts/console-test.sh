#!/usr/bin/env bash
# The console's browser tests (tests/console/): headless Chromium driven by playwright-core,
# against a real `spiced dev` (console.test.mjs) and against serve, relay and worker processes
# on the test services (redrive.test.mjs: needs the environment of scripts/services.sh, as
# scripts/test.sh gives it, or `source target/services/env`). Installs Debian's chromium with
# apt-get if it is missing, and playwright-core from the committed lock into
# target/console-test/. Takes the binary to test as $1 (default target/debug/spiced);
# screenshots go to target/console-screenshots/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${1:-target/debug/spiced}"
[[ -x "$bin" ]] || { echo "console-test: $bin is not built (cargo build)" >&2; exit 1; }

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
    command -v apt-get >/dev/null || { echo "console-test: no $chromium and no apt-get; install Chromium" >&2; exit 1; }
    echo "console-test: apt-get install chromium" >&2
    apt-get install -y -qq chromium >&2 || { apt-get update -qq >&2 && apt-get install -y -qq chromium >&2; }
fi
# console.test.mjs adds a trigger to dev's SQLite database with the sqlite3 shell.
if ! command -v sqlite3 >/dev/null; then
    command -v apt-get >/dev/null || { echo "console-test: no sqlite3 and no apt-get; install the sqlite3 shell" >&2; exit 1; }
    echo "console-test: apt-get install sqlite3" >&2
    apt-get install -y -qq sqlite3 >&2 || { apt-get update -qq >&2 && apt-get install -y -qq sqlite3 >&2; }
fi
command -v node >/dev/null || { echo "console-test: node is not on PATH" >&2; exit 1; }

work=target/console-test
mkdir -p "$work"
cp tests/console/package.json tests/console/package-lock.json tests/console/*.mjs "$work/"
if ! (cd "$work" && npm ci --no-audit --no-fund --silent >&2); then
    echo "console-test: npm ci failed" >&2
    exit 1
fi

shots=target/console-screenshots
rm -rf "$shots"
mkdir -p "$shots"
for test in console redrive; do
    echo "console-test: $test.test.mjs" >&2
    SPICED_BIN="$PWD/$bin" CHROMIUM="$chromium" SCREENSHOTS="$PWD/$shots" node "$work/$test.test.mjs"
done
