#!/usr/bin/env bash
# `cmk-proxy encrypt` under load (issue 15): a legacy table of ROWS rows
# across TENANTS tenants with three protected text columns of ~100 bytes is
# converted in place while pgbench runs a read/update workload through the
# proxy (select a row's three protected columns by key, update an
# unprotected column of another row). Prints:
#   - encrypt's rows/s (its own summary: conversion time, without the wait
#     for proxies before the swap),
#   - the workload's tps before the run and during it (pgbench -P 1 lines
#     inside the conversion window), and their ratio,
#   - encrypt's peak RSS (/usr/bin/time -v), for two batch sizes when
#     BATCHES has two values.
# Settings (environment): ROWS (200000), TENANTS (100), CLIENTS (4),
# BEFORE_SECONDS (10), BATCHES ("1000"), CMK_PROXY_BIN (default
# target/release/cmk-proxy, built if needed), PG_BIN.
# Output: a table on stdout. Everything runs in a throwaway directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${ROWS:-200000}"
TENANTS="${TENANTS:-100}"
CLIENTS="${CLIENTS:-4}"
BEFORE_SECONDS="${BEFORE_SECONDS:-10}"
BATCHES="${BATCHES:-1000}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

log() { printf '[bench-adopt %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench-adopt] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in pgbench psql python3 /usr/bin/time "$PG_BIN/initdb" "$PG_BIN/pg_ctl"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || die "$tool not found: run scripts/install-deps.sh"
done

if [ -n "${CMK_PROXY_BIN:-}" ]; then
    PROXY_BIN="$CMK_PROXY_BIN"
else
    PROXY_BIN="$REPO/target/release/cmk-proxy"
    log "cargo build --release --bin cmk-proxy"
    (cd "$REPO" && cargo build --release --quiet --bin cmk-proxy) || die "release build failed"
fi
[ -x "$PROXY_BIN" ] || die "no proxy binary at $PROXY_BIN"

if [ "$(id -u)" -eq 0 ]; then
    RUN_USER=postgres
    AS_USER=(setpriv --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups --)
else
    RUN_USER="$(id -un)"
    AS_USER=()
fi

WORK="$(mktemp -d /tmp/cmk-bench-adopt-XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    [ -f "$WORK/pg/postmaster.pid" ] && "${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export PGSSLMODE=disable

PG_PORT="$(free_port)"
mkdir -p "$WORK/pg" && chown "$RUN_USER" "$WORK/pg" 2>/dev/null || true
"${AS_USER[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust --no-sync >"$WORK/initdb.log" 2>&1 || die "initdb failed"
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/pg'
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
"${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w -t 60 start >/dev/null || die "PostgreSQL did not start"
admin() { psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=app" -XAtq -v ON_ERROR_STOP=1 "$@"; }
psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -XAtqc 'CREATE DATABASE app' >/dev/null

KEYRING="$WORK/keyring.json"
log "creating $TENANTS tenant keys"
for i in $(seq 1 "$TENANTS"); do
    "$PROXY_BIN" keyring create "tenant_$i" --keyring "$KEYRING" >/dev/null
done
{
    cat <<EOF
upstream: postgres://postgres@127.0.0.1:$PG_PORT/app
tls:
  upstream: {mode: disable}
server: {catalog_refresh: 2s}
keys:
  providers:
    local: {kind: local, path: $KEYRING}
audit:
  sink: {kind: file, path: $WORK/audit.jsonl}
tables:
  public.items:
    tenant_column: tenant_id
    columns:
      a: {type: text}
      b: {type: text}
      c: {type: text}
tenants:
EOF
    for i in $(seq 1 "$TENANTS"); do printf '  tenant_%d: {provider: local, key: tenant_%d}\n' "$i" "$i"; done
} >"$WORK/policy.yaml"

PROXY_PORT="$(free_port)"
RUST_LOG=warn "$PROXY_BIN" serve --config "$WORK/policy.yaml" --listen "127.0.0.1:$PROXY_PORT" >"$WORK/proxy.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 300); do
    psql "host=127.0.0.1 port=$PROXY_PORT user=postgres dbname=app" -XAtqc 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
done

SCRIPT="$WORK/workload.sql"
cat >"$SCRIPT" <<EOF
\\set r random(1, $ROWS)
\\set u random(1, $ROWS)
SELECT a, b, c FROM items WHERE id = :r;
UPDATE items SET score = score + 1 WHERE id = :u;
EOF

printf '| batch | rows | tenants | encrypt rows/s | encrypt s | peak RSS MiB | tps before | tps during | during/before |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for BATCH in $BATCHES; do
    log "legacy table: $ROWS rows, $TENANTS tenants"
    admin -c "DROP TABLE IF EXISTS items CASCADE; DROP TABLE IF EXISTS items__cmk_base CASCADE; DELETE FROM cmk.adoptions" >/dev/null 2>&1 || true
    admin -c "CREATE TABLE items (id bigserial PRIMARY KEY, tenant_id text NOT NULL, a text, b text, c text, score int NOT NULL DEFAULT 0)" >/dev/null
    admin -c "INSERT INTO items (tenant_id, a, b, c)
        SELECT 'tenant_' || (1 + i % $TENANTS),
               rpad('a' || i, 100, 'x'), rpad('b' || i, 100, 'y'), rpad('c' || i, 100, 'z')
        FROM generate_series(1, $ROWS) AS i" -c "VACUUM ANALYZE items" >/dev/null
    sleep 3 # the proxy sees the legacy table

    log "workload alone for ${BEFORE_SECONDS}s"
    BEFORE="$(pgbench -n -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -c "$CLIENTS" -j 2 -T "$BEFORE_SECONDS" -f "$SCRIPT" app 2>/dev/null \
        | awk '/^tps/ {print $3; exit}')"

    log "workload + encrypt (batch $BATCH)"
    pgbench -n -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -c "$CLIENTS" -j 2 -T 3600 -P 1 -f "$SCRIPT" app \
        >"$WORK/during.out" 2>"$WORK/during.err" &
    BENCH_PID=$!
    PIDS+=("$BENCH_PID")
    START_EPOCH="$(date +%s.%N)"
    /usr/bin/time -v "$PROXY_BIN" encrypt --config "$WORK/policy.yaml" --table public.items \
        --batch-size "$BATCH" >"$WORK/encrypt.out" 2>"$WORK/encrypt.err" || die "encrypt failed: $(tail -5 "$WORK/encrypt.err")"
    END_EPOCH="$(date +%s.%N)"
    kill "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
    SUMMARY="$(grep 'rows sealed' "$WORK/encrypt.out" || true)"
    RATE="$(sed -E 's/.*\(([0-9]+) rows\/s\).*/\1/' <<<"$SUMMARY")"
    SECS="$(sed -E 's/.* in ([0-9.]+)s .*/\1/' <<<"$SUMMARY")"
    RSS_KB="$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$WORK/encrypt.err")"
    # pgbench -P lines: "progress: 5.0 s, 1234.5 tps, ...": the conversion
    # window is the last SECS seconds before encrypt ended.
    TOTAL="$(python3 -c "print(float('$END_EPOCH') - float('$START_EPOCH'))")"
    DURING="$(python3 - "$WORK/during.err" "$TOTAL" "$SECS" <<'EOF'
import re, sys
path, total, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lo, hi = total - secs, total
vals = [float(m.group(2)) for m in (re.match(r"progress: ([0-9.]+) s, ([0-9.]+) tps", l) for l in open(path)) if m and lo <= float(m.group(1)) <= hi + 1]
print(f"{sum(vals) / len(vals):.0f}" if vals else "n/a")
EOF
)"
    RATIO="$(python3 -c "
try: print(f'{float(\"$DURING\") / float(\"$BEFORE\"):.2f}')
except Exception: print('n/a')")"
    printf '| %s | %s | %s | %s | %s | %s | %.0f | %s | %s |\n' "$BATCH" "$ROWS" "$TENANTS" "$RATE" "$SECS" \
        "$((RSS_KB / 1024))" "$BEFORE" "$DURING" "$RATIO"
done
