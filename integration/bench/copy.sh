#!/usr/bin/env bash
# COPY FROM STDIN of ROWS rows with three protected columns (ssn with a
# blind index, a note, a date) through cmk-proxy into the encrypted table,
# against the same plaintext COPY straight into PostgreSQL, alternating in
# one run (psql \copy from one generated file). Prints rows/s of each, the
# ratio (issue 16 target: >= 0.5x), and the proxy's RSS before and its peak
# (VmHWM) after: with NOTE_BYTES=1000 the file is about 1 GiB, the issue's
# streaming check (growth <= 64 MiB).
#
# Settings (environment): ROWS (1000000), ROUNDS (2), TENANTS (10),
# NOTE_BYTES (100), WORKER_THREADS (1),
# CMK_PROXY_BIN (default target/release/cmk-proxy, built if needed).
# Output: a table on stdout and integration/bench/results-copy.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROWS="${ROWS:-1000000}"
ROUNDS="${ROUNDS:-2}"
TENANTS="${TENANTS:-10}"
NOTE_BYTES="${NOTE_BYTES:-100}"
WORKER_THREADS="${WORKER_THREADS:-1}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
RESULTS="${RESULTS:-$REPO/integration/bench/results-copy.md}"

log() { printf '[bench-copy %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench-copy] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in psql python3 "$PG_BIN/initdb" "$PG_BIN/pg_ctl"; do
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

WORK="$(mktemp -d /tmp/cmk-bench-copy-XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [ -f "$WORK/pg/postmaster.pid" ]; then
        "${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
export PGSSLMODE=disable

# ---- PostgreSQL: database enc (through the proxy), database plain (direct) ---------
PG_PORT="$(free_port)"
mkdir -p "$WORK/pg" && chown "$RUN_USER" "$WORK/pg" 2>/dev/null || true
"${AS_USER[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/pg'
shared_buffers = 256MB
max_wal_size = 4GB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$WORK/pg/pg_hba.conf"
"${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/pg/server.log" >&2; die "PostgreSQL did not start"; }
admin() { psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=$1" -XAtq -v ON_ERROR_STOP=1 "${@:2}"; }
admin postgres -c 'CREATE DATABASE enc' -c 'CREATE DATABASE plain' >/dev/null
admin enc -c "CREATE TABLE items (id bigint, tenant_id text NOT NULL, ssn bytea, ssn_bidx bytea,
    note bytea, birth_date bytea, cmk_edek jsonb)" >/dev/null
admin plain -c "CREATE TABLE items (id bigint, tenant_id text NOT NULL, ssn text, note text,
    birth_date date)" >/dev/null

# ---- tenants, policy, proxy -------------------------------------------------------
KEYRING="$WORK/keyring.json"
for i in $(seq 1 "$TENANTS"); do
    "$PROXY_BIN" keyring create "tenant_$i" --keyring "$KEYRING" >/dev/null
done
{
    cat <<EOF
upstream: postgres://postgres@127.0.0.1:$PG_PORT/enc
tls:
  upstream: {mode: disable}
server: {worker_threads: $WORKER_THREADS}
keys:
  approval_ttl: 60s
  providers:
    local: {kind: local, path: $KEYRING}
audit:
  sink: {kind: file, path: $WORK/audit.jsonl}
tables:
  public.items:
    tenant_column: tenant_id
    columns:
      ssn: {type: text, search: equality}
      note: {type: text}
      birth_date: {type: date}
tenants:
EOF
    for i in $(seq 1 "$TENANTS"); do
        printf '  tenant_%d: {provider: local, key: tenant_%d}\n' "$i" "$i"
    done
} >"$WORK/policy.yaml"
PROXY_PORT="$(free_port)"
RUST_LOG=warn "$PROXY_BIN" serve --config "$WORK/policy.yaml" --listen "127.0.0.1:$PROXY_PORT" \
    >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for _ in $(seq 1 300); do
    psql "host=127.0.0.1 port=$PROXY_PORT user=postgres dbname=enc" -XAtqc 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
done
status_kib() { awk -v k="$1" '$1 == k { print $2 }' "/proc/$PROXY_PID/status"; }
TICKS="$(getconf CLK_TCK)"
# CPU seconds the proxy has used (user + system).
proxy_cpu() { awk -v t="$TICKS" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$PROXY_PID/stat"; }

# ---- the data: one text-format file, rows cycling through the tenants ------------
DATA="$WORK/items.tsv"
log "generating $ROWS rows (note $NOTE_BYTES bytes)"
python3 - "$DATA" "$ROWS" "$TENANTS" "$NOTE_BYTES" <<'PY'
import sys
path, rows, tenants, note_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
note = ("lorem ipsum dolor sit amet, tab\\there, back\\\\slash " * (note_bytes // 40 + 1))[:note_bytes]
with open(path, "w", buffering=1 << 20) as f:
    for i in range(rows):
        f.write(f"{i}\ttenant_{i % tenants + 1}\t{i % 1000000000:09d}\t{note}\t19{i % 90 + 10}-0{i % 9 + 1}-1{i % 9}\n")
PY
SIZE_MB="$(( $(stat -c %s "$DATA") / 1048576 ))"
COLUMNS="id, tenant_id, ssn, note, birth_date"

copy_once() { # port db -> seconds
    local start end
    admin "$2" -c 'TRUNCATE items' >/dev/null
    start="$(date +%s.%N)"
    psql "host=127.0.0.1 port=$1 user=postgres dbname=$2" -XAtq -v ON_ERROR_STOP=1 \
        -c "\\copy items ($COLUMNS) from '$DATA'" >/dev/null || die "COPY into $2 failed"
    end="$(date +%s.%N)"
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

RSS_BEFORE="$(status_kib VmRSS:)"
CPU_BEFORE="$(proxy_cpu)"
DIRECT=()
PROXY=()
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        DIRECT+=("$(copy_once "$PG_PORT" plain)")
        PROXY+=("$(copy_once "$PROXY_PORT" enc)")
    else
        PROXY+=("$(copy_once "$PROXY_PORT" enc)")
        DIRECT+=("$(copy_once "$PG_PORT" plain)")
    fi
    CPU_AFTER="$(proxy_cpu)"
    log "round $round: direct ${DIRECT[-1]} s, proxy ${PROXY[-1]} s"
done
PEAK="$(status_kib VmHWM:)"
STORED="$(admin enc -c "SELECT count(*) FROM items WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea")"
[ "$STORED" = "$ROWS" ] || die "the encrypted table holds $STORED sealed rows, not $ROWS"

{
    echo "# COPY FROM STDIN through cmk-proxy vs direct ($(date -u +%F))"
    echo
    echo "$ROWS rows ($SIZE_MB MB text file, note $NOTE_BYTES bytes), three protected columns (ssn with blind index, note, date), $TENANTS tenants, psql \\copy, worker_threads $WORKER_THREADS, $ROUNDS alternating rounds."
    echo
    echo "| round | direct rows/s | proxy rows/s | ratio |"
    echo "|---|---|---|---|"
    for i in $(seq 0 $((ROUNDS - 1))); do
        awk -v n="$ROWS" -v d="${DIRECT[$i]}" -v p="${PROXY[$i]}" -v r="$((i + 1))" \
            'BEGIN { printf "| %d | %.0f | %.0f | %.2f |\n", r, n / d, n / p, d / p }'
    done
    echo
    echo "proxy RSS before the COPYs: $((RSS_BEFORE / 1024)) MiB, peak (VmHWM) after: $((PEAK / 1024)) MiB, growth $(((PEAK - RSS_BEFORE) / 1024)) MiB"
    awk -v c0="$CPU_BEFORE" -v c1="$CPU_AFTER" -v n="$ROWS" -v r="$ROUNDS" \
        'BEGIN { printf "proxy CPU: %.2f s for %d rows (%.2f us/row)\n", c1 - c0, n * r, (c1 - c0) * 1e6 / (n * r) }'
    awk -v p="${PROXY[*]}" -v n="$ROWS" 'BEGIN { split(p, a, " "); s = 0; for (i in a) s += a[i]; printf "proxy wall: %.2f s (%.2f us/row)\n", s, s * 1e6 / (n * length(a)) }' 
} | tee "$RESULTS"
