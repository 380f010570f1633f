#!/usr/bin/env bash
# psql session through cmk-proxy: TLS + SCRAM, DDL, insert/select, SQL-level
# PREPARE/EXECUTE, rollback, \copy in and out, drop. Cancel is skipped (psql
# cancels only on Ctrl-C from a terminal).
# Env: DATABASE_URL (with sslmode=verify-full|require), PGSSLROOTCERT (CA).
# Exits non-zero if any check fails; prints "psql: N passed, M failed, K skipped".
set -uo pipefail

: "${DATABASE_URL:?DATABASE_URL must be set}"
export PGCONNECT_TIMEOUT=20

passed=0 failed=0 skipped=0
ok() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1: $2"; }
skip() { skipped=$((skipped + 1)); echo "skip - $1: $2"; }

# Runs psql with the given arguments; unaligned, tuples only, stop on error.
q() { psql "$DATABASE_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@" 2>&1; }

# expect NAME EXPECTED ARGS...: runs q ARGS and compares its output.
expect() {
    local name="$1" want="$2"; shift 2
    local got rc
    got="$(q "$@")"; rc=$?
    if [ $rc -ne 0 ]; then
        fail "$name" "psql exited $rc: $got"
    elif [ "$got" != "$want" ]; then
        fail "$name" "expected [$want], got [$got]"
    else
        ok "$name"
    fi
}

TABLE="psql_t_$$_${RANDOM}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# 1. connect over TLS (client leg) with SCRAM
info="$(q -c '\conninfo')"; rc=$?
if [ $rc -eq 0 ] && grep -q 'SSL connection' <<<"$info"; then
    ok "connect over TLS as scram_user"
else
    fail "connect over TLS as scram_user" "rc=$rc: $info"
    echo "psql: $passed passed, $failed failed, $skipped skipped (stopped: cannot connect)"
    exit 1
fi
expect "session user and database" "scram_user|app" -c "SELECT current_user, current_database()"

# 2. DDL
expect "create table" "" -c "CREATE TABLE $TABLE (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2))"

# 3. insert, select and compare
expect "insert rows" "" -c "INSERT INTO $TABLE VALUES (1, 'alice', 10.50), (2, 'bob', 20.25), (3, 'carol é', NULL)"
expect "select and compare" "1|alice|10.50
2|bob|20.25
3|carol é|" -c "SELECT id, name, amount FROM $TABLE ORDER BY id"

# 4. prepared statement (SQL level: psql 15 has no \bind), executed several times in one session
expect "prepare and execute 5 times" "5|5" \
    -c "PREPARE ins_$TABLE (int, text) AS INSERT INTO $TABLE (id, name) VALUES (\$1, \$2)" \
    -c "EXECUTE ins_$TABLE (10, 'p10')" -c "EXECUTE ins_$TABLE (11, 'p11')" \
    -c "EXECUTE ins_$TABLE (12, 'p12')" -c "EXECUTE ins_$TABLE (13, 'p13')" \
    -c "EXECUTE ins_$TABLE (14, 'p14')" \
    -c "SELECT count(*), count(*) FILTER (WHERE name = 'p' || id) FROM $TABLE WHERE id BETWEEN 10 AND 14"

# 5. transaction with rollback
expect "rollback inside transaction" "1" \
    -c "BEGIN" -c "INSERT INTO $TABLE (id, name) VALUES (100, 'ghost')" \
    -c "SELECT count(*) FROM $TABLE WHERE id = 100" -c "ROLLBACK"
expect "rolled-back row is gone" "0" -c "SELECT count(*) FROM $TABLE WHERE id = 100"

# 6. COPY in and out (\copy: COPY FROM STDIN / TO STDOUT over the wire)
for i in $(seq 1000 1499); do printf '%s\tcopy row %s\t%s.25\n' "$i" "$i" "$i"; done >"$WORK/in.tsv"
expect "copy in 500 rows" "" -c "\\copy $TABLE (id, name, amount) FROM '$WORK/in.tsv'"
expect "copied rows visible" "500|125.00" -c "SELECT count(*), sum(amount) - sum(id) FROM $TABLE WHERE id >= 1000"
expect "copy out" "" -c "\\copy (SELECT id, name, amount FROM $TABLE WHERE id >= 1000 ORDER BY id) TO '$WORK/out.tsv'"
if cmp -s "$WORK/in.tsv" "$WORK/out.tsv"; then
    ok "copy out equals copy in"
else
    fail "copy out equals copy in" "$(diff "$WORK/in.tsv" "$WORK/out.tsv" | head -5)"
fi

# 7. cancel
skip "cancel" "psql sends CancelRequest only on SIGINT from a terminal"

# 8. drop
expect "drop table" "" -c "DROP TABLE $TABLE"
expect "table is gone" "" -c "SELECT to_regclass('$TABLE')"

echo "psql: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
