#!/usr/bin/env bash
# Runs cmk-proxy on embedded defaults: a throwaway local PostgreSQL, a local
# keyring and the example policy, with a short demo. Installs what it needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
exec cargo run --release --locked --features dev --bin cmk-proxy -- dev "$@"
