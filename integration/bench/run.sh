#!/usr/bin/env bash
# Throughput and memory comparison: PostgreSQL direct vs PgBouncer (session
# mode) vs cmk-proxy (passthrough), all on this machine, with pgbench; then
# proxy RSS growth per idle connection, without and with TLS on both legs.
# Everything runs in a throwaway directory removed on exit.
#
# Settings (environment): BENCH_SECONDS (10), ROUNDS (2), SCALE (10),
# CLIENTS (8), THREADS (2), IDLE_CONNS (1000), WORKLOADS (all, space-separated
# names from: select-simple select-extended select-prepared tpcb connect),
# SKIP_IDLE=1, CMK_PROXY_BIN (default target/release/cmk-proxy, built if needed).
# Output: a table on stdout and integration/bench/results-latest.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENCH_SECONDS="${BENCH_SECONDS:-10}"
ROUNDS="${ROUNDS:-2}"
SCALE="${SCALE:-10}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
IDLE_CONNS="${IDLE_CONNS:-1000}"
WORKLOADS="${WORKLOADS:-select-simple select-extended select-prepared tpcb connect}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PYTHON="$REPO/.venv/bin/python"
RESULTS="$REPO/integration/bench/results-latest.md"

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in pgbench psql openssl pgbouncer "$PG_BIN/initdb" "$PG_BIN/pg_ctl"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || [ -x "/usr/sbin/$tool" ] \
        || die "$tool not found: run scripts/install-deps.sh"
done
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
[ -x "$PYTHON" ] || [ "${SKIP_IDLE:-0}" = 1 ] || die "$PYTHON not found: run scripts/install-deps.sh"

# ---- the proxy binary ---------------------------------------------------------
if [ -n "${CMK_PROXY_BIN:-}" ]; then
    PROXY_BIN="$CMK_PROXY_BIN"
else
    PROXY_BIN="$REPO/target/release/cmk-proxy"
    log "cargo build --release --bin cmk-proxy"
    (cd "$REPO" && cargo build --release --quiet --bin cmk-proxy) || die "release build failed"
fi
[ -x "$PROXY_BIN" ] || die "no proxy binary at $PROXY_BIN"

# ---- run-as prefix: PostgreSQL and PgBouncer refuse to run as root ------------
# (setpriv execs, so `"${AS_USER[@]}" prog &` leaves $! = the program's own pid)
if [ "$(id -u)" -eq 0 ]; then
    RUN_USER=postgres
    id "$RUN_USER" >/dev/null 2>&1 || die "user postgres missing (apt package postgresql creates it)"
    AS_USER=(setpriv --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups --)
else
    RUN_USER="$(id -un)"
    AS_USER=()
fi

ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

WORK="$(mktemp -d /tmp/cmk-bench-XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [ -f "$WORK/pg/postmaster.pid" ]; then
        "${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() { # port what [extra libpq options]
    local port="$1" what="$2" i
    for i in $(seq 1 300); do
        if PGCONNECT_TIMEOUT=2 psql "host=127.0.0.1 port=$port user=postgres dbname=bench ${3:-}" \
            -XAtqc 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    die "$what on port $port did not become ready"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---- TLS material (CA, server cert for 127.0.0.1/localhost) ------------------
log "generating TLS certificates"
(
    cd "$WORK"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=cmk-bench-ca" \
        -keyout ca.key -out ca.crt >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout server.key -out server.csr >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.crt >/dev/null 2>&1
    chmod 600 server.key
    chown "$RUN_USER" server.key server.crt ca.crt 2>/dev/null || true
)

# ---- PostgreSQL ---------------------------------------------------------------
PG_PORT="$(free_port)"
log "initdb + start PostgreSQL on 127.0.0.1:$PG_PORT (max_connections 1100, ssl on)"
mkdir -p "$WORK/pg" && chown "$RUN_USER" "$WORK/pg" 2>/dev/null || true
"${AS_USER[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/pg'
max_connections = 1100
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = '$WORK/server.crt'
ssl_key_file = '$WORK/server.key'
log_min_messages = warning
EOF
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$WORK/pg/pg_hba.conf"
"${AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/pg/server.log" >&2; die "PostgreSQL did not start"; }
export PGSSLMODE=disable
psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -XAtqc 'CREATE DATABASE bench' >/dev/null

# ---- PgBouncer ----------------------------------------------------------------
# start_pgbouncer NAME TLS(0|1) -> sets BOUNCER_PID, BOUNCER_PORT
start_pgbouncer() {
    local name="$1" tls="$2" dir="$WORK/$1"
    mkdir -p "$dir"
    BOUNCER_PORT="$(free_port)"
    printf '"postgres" ""\n' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = session
max_client_conn = 1100
default_pool_size = 1100
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
    if [ "$tls" = 1 ]; then
        cat >>"$dir/pgbouncer.ini" <<EOF
client_tls_sslmode = require
client_tls_key_file = $WORK/server.key
client_tls_cert_file = $WORK/server.crt
server_tls_sslmode = require
EOF
    fi
    chown -R "$RUN_USER" "$dir" 2>/dev/null || true
    "${AS_USER[@]}" "$PGBOUNCER" -q "$dir/pgbouncer.ini" >"$dir/stdout.log" 2>&1 &
    BOUNCER_PID=$!
    PIDS+=("$BOUNCER_PID")
    wait_ready "$BOUNCER_PORT" "pgbouncer ($name)" "$([ "$tls" = 1 ] && echo sslmode=require)"
}

# ---- cmk-proxy ----------------------------------------------------------------
# start_proxy NAME TLS(0|1) -> sets PROXY_PID, PROXY_PORT
start_proxy() {
    local name="$1" tls="$2" dir="$WORK/$1"
    mkdir -p "$dir"
    PROXY_PORT="$(free_port)"
    if [ "$tls" = 1 ]; then
        printf 'tls:\n  client: {cert: %s, key: %s}\n  upstream: {mode: require}\n' \
            "$WORK/server.crt" "$WORK/server.key" >"$dir/policy.yaml"
    else
        printf 'tls:\n  upstream: {mode: disable}\n' >"$dir/policy.yaml"
    fi
    RUST_LOG=warn "$PROXY_BIN" serve --config "$dir/policy.yaml" \
        --listen "127.0.0.1:$PROXY_PORT" \
        --upstream "postgres://postgres@127.0.0.1:$PG_PORT/bench" \
        >"$dir/proxy.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_ready "$PROXY_PORT" "cmk-proxy ($name)" "$([ "$tls" = 1 ] && echo sslmode=require)"
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# ---- pgbench ------------------------------------------------------------------
log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >"$WORK/pgbench-init.log" 2>&1 \
    || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

start_pgbouncer bouncer 0
BENCH_BOUNCER_PORT="$BOUNCER_PORT"
start_proxy proxy 0
BENCH_PROXY_PORT="$PROXY_PORT"

declare -A PORT=([direct]="$PG_PORT" [pgbouncer]="$BENCH_BOUNCER_PORT" [cmk-proxy]="$BENCH_PROXY_PORT")
TARGETS=(direct pgbouncer cmk-proxy)

workload_args() {
    case "$1" in
        select-simple) echo "-S -M simple" ;;
        select-extended) echo "-S -M extended" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "-M simple" ;;
        connect) echo "-C -S -M simple" ;;
        *) die "unknown workload $1" ;;
    esac
}

median() { # numbers... -> median (mean of the middle two when even)
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) { print "n/a"; exit }
        if (NR % 2) printf "%.1f\n", a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2] + a[NR/2+1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

declare -A TPS_ALL
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
for w in $WORKLOADS; do
    args="$(workload_args "$w")"
    for r in $(seq 1 "$ROUNDS"); do
        for t in "${TARGETS[@]}"; do
            out="$WORK/pgbench-$w-$t-$r.log"
            # shellcheck disable=SC2086
            if ! pgbench $args -c "$CLIENTS" -j "$THREADS" -T "$BENCH_SECONDS" \
                -h 127.0.0.1 -p "${PORT[$t]}" -U postgres bench >"$out" 2>&1; then
                tail -5 "$out" >&2
                die "pgbench $w against $t failed (output above)"
            fi
            tps="$(awk '/^tps = / {print $3; exit}' "$out")"
            failed="$(awk '/^number of failed transactions:/ {print $5; exit}' "$out")"
            [ -n "$tps" ] || { tail -5 "$out" >&2; die "no tps in pgbench output for $w/$t"; }
            [ "${failed:-0}" = 0 ] || die "pgbench $w against $t had $failed failed transactions"
            TPS_ALL[$w,$t]="${TPS_ALL[$w,$t]:-} $tps"
            log "$w round $r $t: $tps tps"
        done
    done
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
stop_pid "$PROXY_PID"
stop_pid "$BOUNCER_PID"

TABLE="| workload | pgbench args | direct tps | pgbouncer tps | cmk-proxy tps | proxy/pgbouncer | proxy/direct |
|---|---|---:|---:|---:|---:|---:|"
for w in $WORKLOADS; do
    # shellcheck disable=SC2086
    d="$(median ${TPS_ALL[$w,direct]})"
    # shellcheck disable=SC2086
    b="$(median ${TPS_ALL[$w,pgbouncer]})"
    # shellcheck disable=SC2086
    p="$(median ${TPS_ALL[$w,cmk-proxy]})"
    TABLE+="
| $w | \`$(workload_args "$w") -c $CLIENTS -j $THREADS\` | $d | $b | $p | $(ratio "$p" "$b") | $(ratio "$p" "$d") |"
done

# ---- idle connections ---------------------------------------------------------
# count_backends -> "client_backends|of_them_with_tls" in database bench
count_backends() {
    psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres sslmode=disable" -XAtqc \
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = 'bench' AND a.backend_type = 'client backend'"
}

# idle_rss KIND(proxy|pgbouncer) TLS(0|1) -> sets IDLE_RESULT="before_kib after_kib per_conn_kib backends tls_backends"
idle_rss() {
    local kind="$1" tls="$2" pid port dsn tool_pid line before after backends ssl_backends i
    if [ "$kind" = proxy ]; then
        start_proxy "idle-proxy-$tls" "$tls"; pid="$PROXY_PID"; port="$PROXY_PORT"
    else
        start_pgbouncer "idle-bouncer-$tls" "$tls"; pid="$BOUNCER_PID"; port="$BOUNCER_PORT"
    fi
    if [ "$tls" = 1 ]; then
        dsn="host=127.0.0.1 port=$port user=postgres dbname=bench sslmode=verify-full sslrootcert=$WORK/ca.crt"
    else
        dsn="host=127.0.0.1 port=$port user=postgres dbname=bench sslmode=disable"
    fi
    # One connection first, so lazily initialised state is in the baseline.
    psql "$dsn" -XAtqc 'SELECT 1' >/dev/null
    sleep 0.5
    before="$(rss_kib "$pid")"
    "$PYTHON" "$REPO/integration/bench/idle_conns.py" "$dsn" "$IDLE_CONNS" >"$WORK/idle-$kind-$tls.out" 2>&1 &
    tool_pid=$!
    line=""
    for i in $(seq 1 1800); do
        line="$(grep -m1 -E '^(READY|ERROR)' "$WORK/idle-$kind-$tls.out" 2>/dev/null || true)"
        [ -n "$line" ] && break
        kill -0 "$tool_pid" 2>/dev/null || break
        sleep 0.1
    done
    case "$line" in
        READY*) ;;
        *) cat "$WORK/idle-$kind-$tls.out" >&2; stop_pid "$tool_pid"; die "idle connections to $kind (tls=$tls) failed" ;;
    esac
    case "$line" in *"tls=$tls"*) ;; *) stop_pid "$tool_pid"; die "idle connections to $kind: expected tls=$tls, got: $line" ;; esac
    sleep 1
    after="$(rss_kib "$pid")"
    IFS='|' read -r backends ssl_backends <<<"$(count_backends)"
    stop_pid "$tool_pid"
    stop_pid "$pid"
    IDLE_RESULT="$before $after $(awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }') $backends $ssl_backends"
}

IDLE_TABLE=""
if [ "${SKIP_IDLE:-0}" != 1 ]; then
    IDLE_TABLE="| target | TLS (client and upstream) | RSS before (KiB) | RSS with $IDLE_CONNS idle (KiB) | growth per connection (KiB) | upstream backends at peak (with TLS) |
|---|---|---:|---:|---:|---:|"
    for spec in "proxy 0" "proxy 1" "pgbouncer 0" "pgbouncer 1"; do
        set -- $spec
        log "idle: $IDLE_CONNS connections to $1 (tls=$2)"
        idle_rss "$1" "$2"
        read -r before after per backends ssl_backends <<<"$IDLE_RESULT"
        name="$1"; [ "$1" = proxy ] && name=cmk-proxy
        IDLE_TABLE+="
| $name | $([ "$2" = 1 ] && echo yes || echo no) | $before | $after | $per | $backends ($ssl_backends TLS) |"
        log "idle $name tls=$2: $before -> $after KiB, $per KiB/conn, $backends backends ($ssl_backends TLS)"
    done
fi

# ---- report -------------------------------------------------------------------
COMMIT="$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
REPORT="# cmk-proxy benchmark — latest run

- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, proxy binary \`${PROXY_BIN#"$REPO"/}\`
- machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load average before/after: $LOAD_BEFORE / $LOAD_AFTER
- PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $("$PGBOUNCER" --version | head -1), $(pgbench --version | awk '{print "pgbench " $3}')
- settings: BENCH_SECONDS=$BENCH_SECONDS ROUNDS=$ROUNDS SCALE=$SCALE CLIENTS=$CLIENTS THREADS=$THREADS IDLE_CONNS=$IDLE_CONNS
- throughput: plain TCP everywhere (no TLS), trust auth; PgBouncer in session mode;
  cmk-proxy as a passthrough (no policy tables), \`tls.upstream.mode: disable\`.
  Targets run alternating (direct, pgbouncer, cmk-proxy) x ROUNDS; the table shows the median tps.

## Throughput (tps, median of $ROUNDS)

$TABLE
"
if [ -n "$IDLE_TABLE" ]; then
    REPORT+="
## Idle connections: resident memory (VmRSS)

$IDLE_CONNS connections complete startup and stay idle; growth = (RSS with them − RSS after one
connection) / $IDLE_CONNS. TLS = client TLS (verify-full against the bench CA) and upstream
\`mode: require\` (PgBouncer: \`client_tls_sslmode/server_tls_sslmode = require\`).

$IDLE_TABLE
"
fi
printf '%s' "$REPORT" >"$RESULTS"
echo
echo "BENCH_SECONDS=$BENCH_SECONDS ROUNDS=$ROUNDS SCALE=$SCALE CLIENTS=$CLIENTS THREADS=$THREADS IDLE_CONNS=$IDLE_CONNS"
echo
echo "$TABLE"
[ -n "$IDLE_TABLE" ] && { echo; echo "$IDLE_TABLE"; }
echo
echo "written to ${RESULTS#"$REPO"/}"
