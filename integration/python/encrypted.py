"""psycopg 3 on encrypted columns through cmk-proxy (extended protocol).

Table `records` (created by the harness, see integration/README.md) has one
protected column per declared type. With psycopg's own adaptation (Python
int/float/Decimal/date/datetime/UUID/bytes/bool, dict and list via Jsonb;
psycopg sends most of them as binary parameters and small ints as int2):
for tenants acme and globex insert rows covering every type (NULLs, unicode,
1 KiB text, negative and extreme numbers, timestamptz with an offset), read
them back exactly in text and binary format and check the declared types in
the result description and the statement's parameter description; update
(tenant in WHERE; pinned to a session tenant set by startup option and by
SET through the extended protocol); upsert with ON CONFLICT DO UPDATE SET
c = EXCLUDED.c; a prepare=True statement executed several times; ciphertext
at rest through a direct connection; one KM003 refusal; then revoke globex:
KM001 naming the tenant while acme keeps working on the same connection,
and restore.
Env: DATABASE_URL (proxy), PGSSLROOTCERT, CMK_DIRECT_URL (PostgreSQL itself),
CMK_REVOKE_CMD / CMK_RESTORE_CMD, CMK_REVOKED_TENANT (globex), CMK_OTHER_TENANT (acme).
Exits non-zero if any check fails; prints "python-encrypted: N passed, M failed, K skipped".
"""

import os
import subprocess
import sys
import time
import traceback
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} must be set")
    return value


URL = env("DATABASE_URL")
DIRECT = env("CMK_DIRECT_URL")
REVOKE = env("CMK_REVOKE_CMD")
RESTORE = env("CMK_RESTORE_CMD")
REVOKED = os.environ.get("CMK_REVOKED_TENANT", "globex")
OTHER = os.environ.get("CMK_OTHER_TENANT", "acme")

results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name):
    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results["failed"] += 1
            print(f"FAIL - {name}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=4, file=sys.stdout)
        else:
            results["passed"] += 1
            print(f"ok   - {name}")
        return fn

    return wrap


def expect(got, want, what):
    if got != want:
        raise AssertionError(f"{what}:\n  expected {want!r}\n  got      {got!r}")


# ---- the data ---------------------------------------------------------------

COLS = [
    "c_text", "c_varchar", "c_int2", "c_int4", "c_int8", "c_numeric", "c_float8", "c_bool",
    "c_date", "c_timestamp", "c_timestamptz", "c_uuid", "c_jsonb", "c_bytea",
]
# Declared plaintext types the proxy must present (RowDescription / ParameterDescription).
OIDS = [25, 1043, 21, 23, 20, 1700, 701, 16, 1082, 1114, 1184, 2950, 3802, 17]
SELECT = f"SELECT id, tenant_id, label, {', '.join(COLS)} FROM records"
INSERT = (
    f"INSERT INTO records (id, tenant_id, label, {', '.join(COLS)}) "
    f"VALUES ({', '.join(['%s'] * (3 + len(COLS)))})"
)
BIG = "".join(chr(ord("A") + i % 26) for i in range(1024))
UUIDS = {"acme": UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "globex": UUID("b1ffcd00-1d1c-4ef8-bb6d-6bb9bd380a22")}
BASE = {"acme": 0, "globex": 10}
JSON_DOC = {"name": "Zoë", "tags": ["a", "b"], "nested": {"n": -1.5, "ok": True, "none": None}}


def full_text(tenant):
    return f"{tenant}: Zoë says 'hi' — 日本語 🐘 back\\slash"


def rows_for(tenant):
    b = BASE[tenant]
    return [
        (b + 1, tenant, "full", full_text(tenant), f"{tenant} varchar ✓", -32768, -2147483648,
         -9223372036854775808, Decimal("-12345.678900"), -0.1, True, date(2024, 2, 29),
         datetime(2024, 2, 29, 23, 59, 59, 123456),
         datetime(2024, 6, 1, 12, 34, 56, 789000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
         UUIDS[tenant], JSON_DOC, b"\x00\x01\x7f\x80\xffCMK"),
        (b + 2, tenant, "nulls") + (None,) * len(COLS),
        (b + 3, tenant, "extremes", BIG, "", 32767, 2147483647, 9223372036854775807,
         Decimal("123456789012345678901234567890.000000001"), 1e300, False, date(1970, 1, 1),
         datetime(2000, 1, 1), datetime(1969, 7, 20, 20, 17, 40, tzinfo=timezone(timedelta(hours=-4))),
         UUID(int=0), [1, "two", None], b""),
    ]


def params(row):
    """psycopg's natural adaptation; JSON goes through the Jsonb wrapper."""
    return tuple(Jsonb(v) if i == 3 + COLS.index("c_jsonb") and v is not None else v for i, v in enumerate(row))


def exact(row):
    """Comparable form: Decimal by its text (scale included), timestamps with
    their awareness, bytes as bytes (memoryview would compare differently)."""
    out = []
    for v in row:
        if isinstance(v, Decimal):
            out.append(("numeric", str(v)))
        elif isinstance(v, datetime):
            out.append(("aware" if v.tzinfo else "naive", v.astimezone(timezone.utc) if v.tzinfo else v))
        elif isinstance(v, memoryview):
            out.append(bytes(v))
        elif isinstance(v, float):
            out.append(("float", repr(v)))
        else:
            out.append(v)
    return out


def run_cmd(cmd):
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {out.returncode}: {out.stderr}")


# ---- the session ------------------------------------------------------------

try:
    conn = psycopg.connect(URL, autocommit=True, connect_timeout=20)
    direct = psycopg.connect(DIRECT, autocommit=True, connect_timeout=20)
except psycopg.Error as e:
    print(f"FAIL - connect: {type(e).__name__}: {e}")
    print("python-encrypted: 0 passed, 1 failed, 0 skipped (stopped: cannot connect)")
    sys.exit(1)


@check("connect over TLS as scram_user")
def _():
    expect(conn.pgconn.ssl_in_use, True, "ssl_in_use")
    expect(conn.execute("SELECT current_user").fetchone(), ("scram_user",), "user")


@check("insert rows of every type: acme with executemany (pipelined), globex one by one with RETURNING")
def _():
    with conn.cursor() as cur:
        cur.executemany(INSERT, [params(r) for r in rows_for("acme")])
        for row in rows_for("globex"):
            got = cur.execute(INSERT + " RETURNING id, c_int8, c_timestamptz, c_jsonb", params(row)).fetchone()
            expect(exact(got), exact((row[0], row[7], row[13], row[15])), "RETURNING is decrypted")


def read_back(binary):
    for tenant in ("acme", "globex"):
        with conn.cursor(binary=binary) as cur:
            got = cur.execute(SELECT + " WHERE tenant_id = %s ORDER BY id", (tenant,)).fetchall()
            expect([d.type_code for d in cur.description][3:], OIDS, "declared types in RowDescription")
            expect([exact(r) for r in got], [exact(r) for r in rows_for(tenant)], f"{tenant} rows")


@check("read back exactly, text format")
def _():
    read_back(False)


@check("read back exactly, binary format")
def _():
    read_back(True)


@check("ParameterDescription shows the declared types")
def _():
    name = b"cmk_describe_insert"
    placeholders = ", ".join(f"${i}" for i in range(1, 4 + len(COLS)))
    sql = f"INSERT INTO records (id, tenant_id, label, {', '.join(COLS)}) VALUES ({placeholders})"
    res = conn.pgconn.prepare(name, sql.encode())
    expect(res.status, psycopg.pq.ExecStatus.COMMAND_OK, f"prepare: {res.get_error_message()}")
    desc = conn.pgconn.describe_prepared(name)
    expect(desc.status, psycopg.pq.ExecStatus.COMMAND_OK, f"describe: {desc.get_error_message()}")
    expect([desc.param_type(i) for i in range(desc.nparams)][3:], OIDS, "parameter types")
    conn.pgconn.exec_(b"DEALLOCATE " + name)


@check("update with the tenant in WHERE")
def _():
    with conn.cursor() as cur:
        cur.execute("UPDATE records SET c_text = %s WHERE id = %s AND tenant_id = %s", ("acme updated ✓", 1, "acme"))
        expect(cur.rowcount, 1, "rowcount")
        got = cur.execute("SELECT c_text, c_int4 FROM records WHERE id = %s", (1,)).fetchone()
        expect(got, ("acme updated ✓", -2147483648), "updated row")


@check("update pinned to the session tenant (startup option -c cmk.tenant_id=globex)")
def _():
    with psycopg.connect(URL, autocommit=True, connect_timeout=20, options="-c cmk.tenant_id=globex") as c2:
        cur = c2.execute("UPDATE records SET c_int4 = %s, c_date = %s WHERE id = %s", (42, date(2001, 9, 9), 11))
        expect(cur.rowcount, 1, "rowcount")
        got = c2.execute("SELECT c_int4, c_date, c_text FROM records WHERE id = %s", (11,)).fetchone()
        expect(got, (42, date(2001, 9, 9), full_text("globex")), "updated row")


@check("SET cmk.tenant_id through the extended protocol; a row of another tenant is refused with KM004")
def _():
    with psycopg.connect(URL, autocommit=True, connect_timeout=20) as c2:
        c2.execute("SET cmk.tenant_id = 'acme'", binary=True)
        try:
            c2.execute("INSERT INTO records (id, tenant_id, c_text) VALUES (%s, %s, %s)", (99, "globex", "wrong tenant"))
        except psycopg.Error as e:
            expect(e.sqlstate, "KM004", f"SQLSTATE ({e})")
        else:
            raise AssertionError("a globex row was written in an acme session")
        c2.execute("UPDATE records SET c_varchar = %s WHERE id = %s", ("pinned to acme", 3))
        expect(c2.execute("SELECT c_varchar FROM records WHERE id = %s", (3,)).fetchone(), ("pinned to acme",), "row 3")


@check("upsert: ON CONFLICT (id) DO UPDATE SET c = EXCLUDED.c (conflicting and new row)")
def _():
    sql = ("INSERT INTO records (id, tenant_id, c_text, c_numeric, c_jsonb) VALUES (%s, %s, %s, %s, %s) "
           "ON CONFLICT (id) DO UPDATE SET c_text = EXCLUDED.c_text, c_numeric = EXCLUDED.c_numeric, "
           "c_jsonb = EXCLUDED.c_jsonb")
    with conn.cursor() as cur:
        cur.execute(sql, (1, "acme", "upserted ✓", Decimal("1.50"), Jsonb({"v": 2})))
        cur.execute(sql, (4, "acme", "new via upsert", Decimal("2"), None))
        got = cur.execute(
            "SELECT id, c_text, c_numeric, c_jsonb, c_int2, c_bool FROM records WHERE id IN (1, 4) ORDER BY id"
        ).fetchall()
        expect([exact(r) for r in got],
               [exact((1, "upserted ✓", Decimal("1.50"), {"v": 2}, -32768, True)),
                exact((4, "new via upsert", Decimal("2"), None, None, None))], "upserted rows")


@check("prepare=True statements executed 6 times each (server-side prepared)")
def _():
    ins = "INSERT INTO records (id, tenant_id, c_text, c_int8, c_timestamptz, c_float8) VALUES (%s, %s, %s, %s, %s, %s)"
    sel = "SELECT c_text, c_int8, c_timestamptz, c_float8 FROM records WHERE id = %s"
    ts = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with conn.cursor() as cur:
        for i in range(100, 106):
            tenant = "acme" if i % 2 else "globex"
            cur.execute(ins, (i, tenant, f"prepared {i} ü", i, ts + timedelta(minutes=i), i / 8), prepare=True)
        for i in range(100, 106):
            got = cur.execute(sel, (i,), prepare=True).fetchone()
            expect(exact(got), exact((f"prepared {i} ü", i, ts + timedelta(minutes=i), i / 8)), f"row {i}")
        with conn.cursor(binary=True) as bcur:
            for i in range(100, 106):
                got = bcur.execute(sel, (i,), prepare=True).fetchone()
                expect(exact(got), exact((f"prepared {i} ü", i, ts + timedelta(minutes=i), i / 8)), f"binary row {i}")
        n = cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()[0]
        if n < 2:
            raise AssertionError(f"expected >= 2 protocol-level prepared statements, got {n}")


CELLS = ", ".join(f"({c})" for c in COLS)


@check("at rest (direct connection): every cell an envelope, EDEK and blind index set, NULLs stay NULL")
def _():
    total, envelopes = direct.execute(
        f"SELECT count(cell), count(*) FILTER (WHERE substr(cell, 1, 4) = '\\x434d4b01'::bytea) "
        f"FROM records, LATERAL (VALUES {CELLS}) AS v(cell)").fetchone()
    if total < 50:
        raise AssertionError(f"only {total} cells at rest")
    expect(envelopes, total, "cells starting with CMK\\x01")
    bad = direct.execute(
        f"SELECT id FROM records WHERE (num_nonnulls({', '.join(COLS)}) > 0 AND (cmk_edek IS NULL "
        f"OR jsonb_typeof(cmk_edek) <> 'object' OR cmk_edek = '{{}}')) OR (c_text IS NULL) <> (c_text_bidx IS NULL)"
    ).fetchall()
    expect(bad, [], "rows without EDEK or with a missing blind index")
    nulls = direct.execute(f"SELECT num_nulls({', '.join(COLS)}) FROM records WHERE id IN (2, 12) ORDER BY id").fetchall()
    expect(nulls, [(14,), (14,)], "NULL cells")
    raw = direct.execute(f"SELECT {', '.join(COLS)} FROM records").fetchall()
    secrets = [s.encode() for s in ("Zoë", "varchar ✓", "12345.6789", "2024-02-29", str(UUIDS["acme"]), "nested", BIG[:16])]
    secrets += [b"\x00\x01\x7f\x80\xff", UUIDS["acme"].bytes]
    for row in raw:
        for cell in row:
            if cell is not None:
                for s in secrets:
                    if s in bytes(cell):
                        raise AssertionError(f"plaintext {s!r} at rest")


@check("KM003 for WHERE on a protected column (names table and column); the connection stays usable")
def _():
    try:
        conn.execute("SELECT id FROM records WHERE c_int4 = %s", (42,))
    except psycopg.Error as e:
        expect(e.sqlstate, "KM003", f"SQLSTATE ({e})")
        msg = e.diag.message_primary or ""
        if "public.records" not in msg or "c_int4" not in msg:
            raise AssertionError(f"message does not name table and column: {msg}")
    else:
        raise AssertionError("WHERE c_int4 = $1 was not refused")
    expect(conn.execute("SELECT count(*) FROM records WHERE id < %s", (50,)).fetchone(), (7,), "usable after KM003")


@check("equality lookup on the searchable c_text through the blind index: tenant in WHERE, = ANY, pipeline, session tenant")
def _():
    for tenant in ("acme", "globex"):
        stored = conn.execute("SELECT id, c_text FROM records WHERE tenant_id = %s", (tenant,)).fetchall()
        texts = sorted({t for _, t in stored if t is not None})
        for text in texts:
            want = sorted(i for i, t in stored if t == text)
            got = [r[0] for r in conn.execute(
                "SELECT id FROM records WHERE tenant_id = %s AND c_text = %s ORDER BY id", (tenant, text))]
            expect(got, want, f"{tenant}: c_text = %s")
        got = [r[0] for r in conn.execute(
            "SELECT id FROM records WHERE tenant_id = %s AND c_text = ANY(%s) ORDER BY id", (tenant, texts))]
        expect(got, sorted(i for i, t in stored if t is not None), f"{tenant}: c_text = ANY(%s)")
        expect(conn.execute("SELECT count(*) FROM records WHERE tenant_id = %s AND c_text = %s",
                            (tenant, "no such value")).fetchone(), (0,), "a value no row has")
    stored = conn.execute("SELECT id, c_text FROM records WHERE tenant_id = 'acme' AND c_text IS NOT NULL").fetchall()
    with psycopg.connect(URL, autocommit=True, connect_timeout=20, options="-c cmk.tenant_id=acme") as c2:
        with c2.pipeline():
            cursors = [c2.execute("SELECT id FROM records WHERE c_text = %s ORDER BY id", (t,)) for _, t in stored]
        for (i, t), cur in zip(stored, cursors):
            expect(sorted(r[0] for r in cur.fetchall()), sorted(j for j, u in stored if u == t), "pipelined lookup")


@check("KM003 inside a transaction fails the server transaction too: COMMIT keeps nothing of it")
def _():
    with psycopg.connect(URL, connect_timeout=20) as c2:
        c2.execute("INSERT INTO records (id, tenant_id, c_text) VALUES (%s, %s, %s)", (300, "acme", "half of the work"))
        try:
            c2.execute("SELECT id FROM records WHERE c_int4 = %s", (1,))
        except psycopg.Error as e:
            expect(e.sqlstate, "KM003", f"SQLSTATE ({e})")
        else:
            raise AssertionError("WHERE c_int4 = $1 was not refused")
        try:
            c2.execute("SELECT 1")
        except psycopg.Error as e:
            expect(e.sqlstate, "25P02", f"the server transaction is aborted ({e})")
        else:
            raise AssertionError("the transaction went on after KM003")
        c2.commit()
    expect(direct.execute("SELECT count(*) FROM records WHERE id = 300").fetchone(), (0,), "rows of the failed transaction")


def poll(fn, want_error, what):
    """Calls fn until it raises (want_error) or succeeds; returns the error.
    10 s only guards against a hang: approval_ttl is 1 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            fn()
        except psycopg.Error as e:
            if want_error:
                return e
            last = e
        else:
            if not want_error:
                return None
            last = "still readable"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {last}")
        time.sleep(0.2)


def read_tenant(tenant, binary=False, prepare=None):
    with conn.cursor(binary=binary) as cur:
        sql = SELECT + " WHERE tenant_id = %s AND id < 50 ORDER BY id"
        return cur.execute(sql, (tenant,), prepare=prepare).fetchall()


@check(f"revoke {REVOKED}: KM001 naming the tenant; {OTHER} keeps reading and writing on the same connection")
def _():
    run_cmd(REVOKE)
    e = poll(lambda: read_tenant(REVOKED, prepare=True), True, f"{REVOKED} reads after revocation")
    expect(e.sqlstate, "KM001", f"SQLSTATE ({e})")
    if REVOKED not in str(e):
        raise AssertionError(f"KM001 message does not name {REVOKED}: {e}")
    for binary in (False, True):
        try:
            read_tenant(REVOKED, binary=binary)
        except psycopg.Error as e2:
            expect(e2.sqlstate, "KM001", f"binary={binary} SQLSTATE ({e2})")
        else:
            raise AssertionError("revoked tenant readable")
    got = read_tenant(OTHER, prepare=True)
    expect(len(got), 4, f"{OTHER} rows")
    conn.execute("INSERT INTO records (id, tenant_id, c_text) VALUES (%s, %s, %s)", (5, OTHER, "written while revoked"))
    expect(conn.execute("SELECT c_text FROM records WHERE id = %s", (5,)).fetchone(), ("written while revoked",), "new row")
    try:
        conn.execute("INSERT INTO records (id, tenant_id, c_text) VALUES (%s, %s, %s)", (15, REVOKED, "refused"))
    except psycopg.Error as e3:
        expect(e3.sqlstate, "KM001", f"write SQLSTATE ({e3})")
    else:
        raise AssertionError("a revoked tenant's row was written")


@check(f"restore {REVOKED}: its rows read again")
def _():
    run_cmd(RESTORE)
    poll(lambda: read_tenant(REVOKED, prepare=True), False, f"{REVOKED} reads after restore")
    got = read_tenant(REVOKED, binary=True)
    expect(exact(got[0])[3], full_text(REVOKED), "c_text of the first row")


conn.close()
direct.close()
print(f"python-encrypted: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
sys.exit(1 if results["failed"] else 0)
