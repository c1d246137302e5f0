#!/usr/bin/env bash
# Runs every test of the workspace. Tests that need PostgreSQL find one by themselves
# ($DATABASE_URL, else 127.0.0.1:5432, else a private server started with initdb);
# this script only makes the common case fast by starting the machine's own server
# when it is installed but stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "cargo-nextest not found; installing it (once)" >&2
    cargo install --locked cargo-nextest
fi

if [ -z "${DATABASE_URL:-}" ] && command -v pg_isready >/dev/null 2>&1 \
    && ! pg_isready -q -h 127.0.0.1 -p 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
    done
fi

exec cargo nextest run --workspace --no-fail-fast "$@"
