#!/usr/bin/env bash
# psql on encrypted columns through cmk-proxy (simple query protocol; psql 15
# has no \bind, so its statements carry literals). Table `records` (created by
# the harness, see integration/README.md) has one protected column per
# declared type. For tenants acme and globex: insert rows covering every type
# (NULLs, unicode, 1 KiB text, negative and extreme numbers, timestamptz with
# an offset), read them back exactly, update (tenant in WHERE, and pinned to
# the session tenant), upsert with ON CONFLICT DO UPDATE SET c = EXCLUDED.c,
# check the ciphertext at rest through a direct connection, one KM003
# refusal, then revoke globex: KM001 naming the tenant while acme keeps
# working on the same connection, and restore.
# Env: DATABASE_URL (proxy), PGSSLROOTCERT, CMK_DIRECT_URL (PostgreSQL itself),
# CMK_REVOKE_CMD / CMK_RESTORE_CMD (disable / enable globex's key).
# Exits non-zero if any check fails; prints "psql-encrypted: N passed, M failed, K skipped".
set -uo pipefail

: "${DATABASE_URL:?DATABASE_URL must be set}"
: "${CMK_DIRECT_URL:?CMK_DIRECT_URL must be set}"
: "${CMK_REVOKE_CMD:?CMK_REVOKE_CMD must be set}"
: "${CMK_RESTORE_CMD:?CMK_RESTORE_CMD must be set}"
export PGCONNECT_TIMEOUT=20
# Direct reads print timestamptz in UTC, like the proxy's canonical form.
export PGTZ=UTC

passed=0 failed=0 skipped=0
ok() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1: $2"; }
skip() { skipped=$((skipped + 1)); echo "skip - $1: $2"; }

# q ARGS: psql through the proxy; unaligned, tuples only, stop on error.
q() { psql "$DATABASE_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@" 2>&1; }
# qk ARGS: one psql session that keeps going after errors and prints SQLSTATEs.
qk() { psql "$DATABASE_URL" -X -q -A -t -v ON_ERROR_STOP=0 -v VERBOSITY=verbose "$@" 2>&1; }
# d ARGS: psql directly against PostgreSQL.
d() { psql "$CMK_DIRECT_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@" 2>&1; }

# expect NAME EXPECTED COMMAND ARGS...: runs COMMAND ARGS and compares its output.
expect() {
    local name="$1" want="$2"; shift 2
    local got rc
    got="$("$@")"; rc=$?
    if [ $rc -ne 0 ]; then
        fail "$name" "exited $rc: $got"
    elif [ "$got" != "$want" ]; then
        fail "$name" "diff expected got:
$(diff <(printf '%s\n' "$want") <(printf '%s\n' "$got"))"
    else
        ok "$name"
    fi
}

# contains NAME OUTPUT PATTERN...: OUTPUT has every (fixed-string) pattern.
contains() {
    local name="$1" out="$2"; shift 2
    local p
    for p in "$@"; do
        if ! grep -qF -- "$p" <<<"$out"; then
            fail "$name" "no [$p] in [$out]"
            return
        fi
    done
    ok "$name"
}

COLS="c_text, c_varchar, c_int2, c_int4, c_int8, c_numeric, c_float8, c_bool, c_date, c_timestamp, c_timestamptz, c_uuid, c_jsonb, c_bytea"
BIG=""
letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ
for ((i = 0; i < 1024; i++)); do BIG+="${letters:i%26:1}"; done
JSON='{"name": "Zoë", "tags": ["a", "b"], "nested": {"n": -1.5, "ok": true, "none": null}}'

# values_sql TENANT BASE UUID: three rows (full, all NULL, extremes).
values_sql() {
    local t="$1" b="$2" u="$3"
    cat <<EOF
($((b + 1)), '$t', 'full', '$t: Zoë says ''hi'' — 日本語 🐘 back\\slash', '$t varchar ✓', -32768, -2147483648, -9223372036854775808,
 -12345.678900, -0.1, true, '2024-02-29', '2024-02-29 23:59:59.123456', '2024-06-01 12:34:56.789+05:30', '$u',
 '$JSON', '\\x00017f80ff434d4b'),
($((b + 2)), '$t', 'nulls', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
($((b + 3)), '$t', 'extremes', '$BIG', '', 32767, 2147483647, 9223372036854775807,
 123456789012345678901234567890.000000001, 1e300, false, '1970-01-01', '2000-01-01 00:00:00', '1969-07-20 20:17:40-04', '00000000-0000-0000-0000-000000000000',
 '[1, "two", null]', '\\x')
EOF
}

# expected_rows TENANT BASE UUID: what reading those rows back prints.
expected_rows() {
    local t="$1" b="$2" u="$3"
    printf '%s\n' \
        "$((b + 1))|$t|full|$t: Zoë says 'hi' — 日本語 🐘 back\\slash|$t varchar ✓|-32768|-2147483648|-9223372036854775808|-12345.678900|-0.1|t|2024-02-29|2024-02-29 23:59:59.123456|2024-06-01 07:04:56.789+00|$u|$JSON|\\x00017f80ff434d4b" \
        "$((b + 2))|$t|nulls||||||||||||||" \
        "$((b + 3))|$t|extremes|$BIG||32767|2147483647|9223372036854775807|123456789012345678901234567890.000000001|1e+300|f|1970-01-01|2000-01-01 00:00:00|1969-07-21 00:17:40+00|00000000-0000-0000-0000-000000000000|[1, \"two\", null]|\\x"
}

UUID_ACME=a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11
UUID_GLOBEX=b1ffcd00-1d1c-4ef8-bb6d-6bb9bd380a22

# 1. connect
info="$(q -c '\conninfo')"; rc=$?
if [ $rc -eq 0 ] && grep -q 'SSL connection' <<<"$info"; then
    ok "connect over TLS as scram_user"
else
    fail "connect over TLS as scram_user" "rc=$rc: $info"
    echo "psql-encrypted: $passed passed, $failed failed, $skipped skipped (stopped: cannot connect)"
    exit 1
fi

# 2. insert rows of every type for both tenants (row tenant from the literal)
expect "insert acme rows (RETURNING decrypted)" "1|-2147483648
2|
3|2147483647" q -c "INSERT INTO records (id, tenant_id, label, $COLS) VALUES $(values_sql acme 0 $UUID_ACME) RETURNING id, c_int4"
expect "insert globex rows" "" q -c "INSERT INTO records (id, tenant_id, label, $COLS) VALUES $(values_sql globex 10 $UUID_GLOBEX)"

# 3. read back exactly
expect "read acme rows of every type" "$(expected_rows acme 0 $UUID_ACME)" \
    q -c "SELECT id, tenant_id, label, $COLS FROM records WHERE tenant_id = 'acme' ORDER BY id"
expect "read globex rows of every type" "$(expected_rows globex 10 $UUID_GLOBEX)" \
    q -c "SELECT id, tenant_id, label, $COLS FROM records WHERE tenant_id = 'globex' ORDER BY id"
expect "SELECT * hides the EDEK and blind index columns" "$(expected_rows acme 0 $UUID_ACME | head -1)" \
    q -c "SELECT * FROM records WHERE id = 1"

expect "\\gdesc (Parse/Describe) shows the declared types" "c_text|text
c_varchar|character varying
c_int2|smallint
c_int4|integer
c_int8|bigint
c_numeric|numeric
c_float8|double precision
c_bool|boolean
c_date|date
c_timestamp|timestamp without time zone
c_timestamptz|timestamp with time zone
c_uuid|uuid
c_jsonb|jsonb
c_bytea|bytea" q -f - <<<"SELECT $COLS FROM records \\gdesc"

# 4. update: tenant in WHERE; and pinned to the session tenant (SET cmk.tenant_id)
expect "update with the tenant in WHERE" "acme updated ✓|-2147483648" \
    q -c "UPDATE records SET c_text = 'acme updated ✓' WHERE id = 1 AND tenant_id = 'acme'" \
    -c "SELECT c_text, c_int4 FROM records WHERE id = 1"
expect "update pinned to the session tenant" "42|globex: Zoë says 'hi' — 日本語 🐘 back\\slash" \
    q -c "SET cmk.tenant_id = 'globex'" -c "UPDATE records SET c_int4 = 42 WHERE id = 11" \
    -c "SELECT c_int4, c_text FROM records WHERE id = 11"
out="$(qk -c "SET cmk.tenant_id = 'acme'" \
    -c "INSERT INTO records (id, tenant_id, c_text) VALUES (99, 'globex', 'wrong tenant')" \
    -c "SELECT 'still usable'")"
contains "row tenant disagreeing with the session tenant: KM004" "$out" "KM004" "still usable"

# 5. upsert: ON CONFLICT (id) DO UPDATE SET col = EXCLUDED.col (one conflicting row, one new)
expect "upsert updates the conflicting row and inserts the new one" "1|upserted ✓|1.50|-32768|t
4|new via upsert|2||" \
    q -c "INSERT INTO records (id, tenant_id, c_text, c_numeric) VALUES (1, 'acme', 'upserted ✓', 1.50), (4, 'acme', 'new via upsert', 2) ON CONFLICT (id) DO UPDATE SET c_text = EXCLUDED.c_text, c_numeric = EXCLUDED.c_numeric" \
    -c "SELECT id, c_text, c_numeric, c_int2, c_bool FROM records WHERE id IN (1, 4) ORDER BY id"

skip "prepared statement" "psql 15 has no \\bind; SQL-level PREPARE is not a protocol prepared statement"

# 6. at rest (direct connection): envelopes, EDEKs, blind index, NULLs, no plaintext
CELLS="(c_text), (c_varchar), (c_int2), (c_int4), (c_int8), (c_numeric), (c_float8), (c_bool), (c_date), (c_timestamp), (c_timestamptz), (c_uuid), (c_jsonb), (c_bytea)"
expect "at rest: every non-NULL cell is an envelope (CMK\\x01...)" "t" \
    d -c "SELECT count(cell) > 50 AND count(cell) = count(*) FILTER (WHERE substr(cell, 1, 4) = '\\x434d4b01'::bytea) FROM records, LATERAL (VALUES $CELLS) AS v(cell)"
expect "at rest: rows with cells carry an EDEK and a blind index" "0|0|1" \
    d -c "SELECT count(*) FILTER (WHERE num_nonnulls($COLS) > 0 AND (cmk_edek IS NULL OR cmk_edek = '{}'::jsonb)), count(*) FILTER (WHERE (c_text IS NULL) <> (c_text_bidx IS NULL)), (bool_and(jsonb_typeof(cmk_edek) = 'object') FILTER (WHERE cmk_edek IS NOT NULL))::int FROM records"
expect "at rest: NULL stays NULL" "14|14" \
    d -c "SELECT string_agg(num_nulls($COLS)::text, '|' ORDER BY id) FROM records WHERE id IN (2, 12)"
expect "at rest: no plaintext in any cell" "0" \
    d -c "SELECT count(*) FROM records, LATERAL (VALUES $CELLS) AS v(cell), unnest(ARRAY['Zoë', 'varchar ✓', '12345.6789', '2024-02-29', '$UUID_ACME', 'nested', 'ABCDEFGHIJKLMNOP']) AS p(plain) WHERE position(convert_to(p.plain, 'UTF8') IN cell) > 0 OR position('\\x00017f80ff'::bytea IN cell) > 0"

# 7. a statement the proxy cannot run on ciphertext: KM003, then the connection still works
out="$(qk -c "SELECT id FROM records WHERE c_int4 = 42" -c "SELECT 'usable after KM003', count(*) FROM records")"
contains "KM003 for WHERE on a protected column (names table and column), connection usable" "$out" \
    "KM003" "public.records" "c_int4" "usable after KM003|7"

out="$(qk -c "BEGIN" -c "INSERT INTO records (id, tenant_id, c_text) VALUES (300, 'acme', 'half of the work')" \
    -c "SELECT id FROM records WHERE c_int4 = 1" -c "SELECT 'after KM003'" -c "COMMIT")"
contains "KM003 inside a transaction fails the server transaction too" "$out" "KM003" "25P02"
expect "COMMIT after KM003 keeps nothing of the transaction" "0" d -c "SELECT count(*) FROM records WHERE id = 300"

# 8. revocation: globex's key is disabled
GLOBEX_READ="SELECT id, c_text FROM records WHERE tenant_id = 'globex' ORDER BY id"
ACME_READ="SELECT 'acme ok', c_text FROM records WHERE id = 1"
revoke_out="$(bash -c "$CMK_REVOKE_CMD" 2>&1)" || fail "revoke command" "$revoke_out"
deadline=$((SECONDS + 10))
while :; do
    out="$(qk -c "$GLOBEX_READ" -c "$ACME_READ" \
        -c "INSERT INTO records (id, tenant_id, c_text) VALUES (5, 'acme', 'written while globex is revoked')" \
        -c "INSERT INTO records (id, tenant_id, c_text) VALUES (15, 'globex', 'refused')" \
        -c "SELECT 'acme write ok', c_text FROM records WHERE id = 5")"
    # The read and the write of globex each need an approval, and the cached one
    # can expire between them: wait for the round where both are refused.
    if [ "$(grep -c KM001 <<<"$out")" -ge 2 ] || [ $SECONDS -ge $deadline ]; then break; fi
    # Undo the writes of a round where globex was still (partly) approved.
    q -c "DELETE FROM records WHERE id IN (5, 15)" >/dev/null
    sleep 0.2
done
contains "revoked tenant: KM001 naming globex; acme reads and writes on the same connection" "$out" \
    "KM001" "globex" "acme ok|upserted ✓" "acme write ok|written while globex is revoked"
if grep -q "^11|" <<<"$out" || [ "$(grep -c KM001 <<<"$out")" -lt 2 ]; then
    fail "revoked tenant: neither read nor written" "$out"
else
    ok "revoked tenant: neither read nor written"
fi

# 9. restore: globex reads work again
restore_out="$(bash -c "$CMK_RESTORE_CMD" 2>&1)" || fail "restore command" "$restore_out"
deadline=$((SECONDS + 10))
while :; do
    out="$(q -c "$GLOBEX_READ" -c "$ACME_READ")" && break
    [ $SECONDS -ge $deadline ] && break
    sleep 0.2
done
expect "restored tenant reads again" "11|globex: Zoë says 'hi' — 日本語 🐘 back\\slash
12|
13|$BIG
acme ok|upserted ✓" printf '%s' "$out"

echo "psql-encrypted: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
