#!/usr/bin/env bash
# Runs every test of cmk-proxy: formatting and lints, unit tests, the Rust
# integration tests against throwaway PostgreSQL clusters and a local AWS KMS
# (moto), and the real-client sessions (psql, psycopg 3, node-postgres, pgJDBC).
# Installs what it needs first (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== dependencies"
scripts/install-deps.sh

# A cold build needs a few GB under target/; say so plainly rather than let
# the linker die with SIGBUS when the disk fills.
free_kib=$(df -Pk . 2>/dev/null | awk 'NR == 2 { print $4 }' || true)
if [ -n "$free_kib" ]; then
    echo "== free disk: $((free_kib / 1024 / 1024)) GiB"
    if [ "$free_kib" -lt $((4 * 1024 * 1024)) ]; then
        echo "warning: less than 4 GiB free; the build may fail for lack of disk" >&2
    fi
fi
# CI builds once from clean: incremental caches would only cost disk.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

# No Docker engine here: check the compose file where a client can read it.
if docker compose version >/dev/null 2>&1; then
    echo "== docker compose config"
    docker compose config -q
elif command -v docker-compose >/dev/null 2>&1; then
    echo "== docker-compose config"
    docker-compose config -q
else
    echo "== docker compose: no client with compose here; docker-compose.yml is checked by tests/it/ops_container.rs only"
fi

echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

echo "== tests"
# Each test starts its own PostgreSQL; most of their time is waiting, so
# run more of them at once than there are cores.
threads="${TEST_THREADS:-6}"
if cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doc tests; run them first so the summary of the
    # whole suite is the last thing printed.
    cargo test --locked --doc
    cargo nextest run --locked --no-fail-fast --test-threads "$threads"
else
    cargo test --locked --no-fail-fast -- --test-threads "$threads"
fi
