#!/usr/bin/env bash
# Installs spiced on a VM: the `spiced` system user, /etc/spiced (config and a secrets file),
# /var/lib/spiced, the release binary in /usr/local/bin, and the systemd units.
#
# Idempotent: an existing /etc/spiced/spiced.toml or spiced.env is never overwritten.
# Usage: sudo scripts/install.sh            (builds with cargo if target/release/spiced is missing)
#        SPICED_INSTALL_ROOT=/tmp/root scripts/install.sh   (stage into a directory, no users)
#        SPICED_BINARY=path/to/spiced scripts/install.sh    (install that binary instead)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="${SPICED_INSTALL_ROOT:-/}"
ROOT="${ROOT%/}"
say() { echo "install: $*" >&2; }

BINARY="${SPICED_BINARY:-target/release/spiced}"
if [[ ! -x "$BINARY" ]]; then
    say "building the release binary"
    cargo build --release --locked
fi

if [[ -z "$ROOT" ]]; then
    if ! id spiced >/dev/null 2>&1; then
        say "creating system user spiced"
        useradd --system --home-dir /var/lib/spiced --shell /usr/sbin/nologin spiced
    else
        say "user spiced exists"
    fi
fi

say "installing ${ROOT}/usr/local/bin/spiced"
install -D -m 0755 "$BINARY" "${ROOT}/usr/local/bin/spiced"
install -D -m 0644 README.md "${ROOT}/usr/local/share/doc/spiced/README.md"
say "installing the man page and bash completions"
mkdir -p "${ROOT}/usr/local/share/man/man1" "${ROOT}/usr/share/bash-completion/completions"
"$BINARY" man >"${ROOT}/usr/local/share/man/man1/spiced.1"
"$BINARY" completions bash >"${ROOT}/usr/share/bash-completion/completions/spiced"
install -d -m 0750 "${ROOT}/etc/spiced" "${ROOT}/var/lib/spiced"

if [[ ! -e "${ROOT}/etc/spiced/spiced.toml" ]]; then
    say "writing ${ROOT}/etc/spiced/spiced.toml from config/spiced.example.toml (edit it)"
    install -m 0640 config/spiced.example.toml "${ROOT}/etc/spiced/spiced.toml"
else
    say "keeping existing ${ROOT}/etc/spiced/spiced.toml"
fi
if [[ ! -e "${ROOT}/etc/spiced/spiced.env" ]]; then
    say "writing ${ROOT}/etc/spiced/spiced.env (secrets, mode 0600)"
    install -m 0600 /dev/null "${ROOT}/etc/spiced/spiced.env"
    cat > "${ROOT}/etc/spiced/spiced.env" <<'ENV'
# Secrets for spiced, read by the systemd units (EnvironmentFile). Never commit this file.
# SPICED_DATABASE__URL=postgres://spiced:PASSWORD@db.internal:5432/spiced
# AWS_ACCESS_KEY_ID=...
# AWS_SECRET_ACCESS_KEY=...
# Any librdkafka property, e.g. the SASL password (`_` stands for `.` in the key):
# SPICED_KAFKA__PROPERTIES__SASL_PASSWORD=...
ENV
fi

if [[ ! -e "${ROOT}/etc/spiced/tokens" ]]; then
    say "writing ${ROOT}/etc/spiced/tokens (API bearer tokens, mode 0600)"
    install -m 0600 /dev/null "${ROOT}/etc/spiced/tokens"
    echo "# name scope token   (scope: read, write or admin; one token per line)" > "${ROOT}/etc/spiced/tokens"
    say "add a token to ${ROOT}/etc/spiced/tokens before starting spiced-serve: it refuses an empty token file"
    say "  e.g. echo \"ops admin \$(head -c 24 /dev/urandom | base64)\" >> ${ROOT}/etc/spiced/tokens"
fi

for unit in systemd/*.service; do
    say "installing unit $(basename "$unit")"
    install -D -m 0644 "$unit" "${ROOT}/etc/systemd/system/$(basename "$unit")"
done

if [[ -z "$ROOT" ]]; then
    chown -R root:spiced /etc/spiced
    chmod 0640 /etc/spiced/tokens /etc/spiced/spiced.env
    chown spiced:spiced /var/lib/spiced
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        say "done: edit /etc/spiced/spiced.toml and spiced.env, run 'spiced migrate --config /etc/spiced/spiced.toml', then"
        say "  systemctl enable --now spiced-serve spiced-relay spiced-worker@ontology spiced-worker@instance"
    else
        say "done (systemd is not running here: units installed, not loaded)"
    fi
fi
