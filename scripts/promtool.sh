#!/usr/bin/env bash
# Prints the path of a promtool, for checking deploy/prometheus (scripts/test.sh).
#
# Uses one on PATH; otherwise unpacks the one in Debian's `prometheus` package into
# target/tools/ with `apt-get download` and `dpkg-deb -x`: installing the package would
# start a Prometheus server on the machine, and the test run must leave the machine as it
# found it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v promtool >/dev/null; then
    command -v promtool
    exit 0
fi

dir="$PWD/target/tools/prometheus"
tool="$dir/usr/bin/promtool"
if [[ ! -x "$tool" ]]; then
    command -v apt-get >/dev/null || { echo "promtool: not on PATH and apt-get not found; install Prometheus's promtool" >&2; exit 1; }
    mkdir -p "$dir"
    download() { (cd "$dir" && apt-get download -qq prometheus >&2 2>/dev/null); }
    if ! download; then
        echo "promtool: apt-get update" >&2
        apt-get update -qq >&2
        download || { echo "promtool: apt-get download prometheus failed" >&2; exit 1; }
    fi
    dpkg-deb -x "$dir"/prometheus_*.deb "$dir"
    rm -f "$dir"/prometheus_*.deb
fi
"$tool" --version >/dev/null
echo "$tool"
