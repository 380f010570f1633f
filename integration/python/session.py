"""psycopg 3 session through cmk-proxy.

TLS + SCRAM, DDL, parameterised insert/select, server-side prepared statement
(prepare=True) executed several times, rollback, COPY in and out, cancel of a
running pg_sleep(30) from another thread (conn.cancel(), and cancel_safe() when
available), drop. Env: DATABASE_URL (sslmode=verify-full|require), PGSSLROOTCERT.
Exits non-zero if any check fails; prints "python: N passed, M failed, K skipped".
"""

import os
import sys
import threading
import time
import traceback
from decimal import Decimal

import psycopg
from psycopg import errors

URL = os.environ.get("DATABASE_URL")
if not URL:
    sys.exit("DATABASE_URL must be set")

TABLE = f"py_t_{os.getpid()}_{int(time.time() * 1000) % 100000}"
results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name):
    """Decorator-ish runner: runs fn(), records ok/FAIL with the exception."""

    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results["failed"] += 1
            print(f"FAIL - {name}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3, file=sys.stdout)
        else:
            results["passed"] += 1
            print(f"ok   - {name}")
        return fn

    return wrap


def expect(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: expected {want!r}, got {got!r}")


try:
    conn = psycopg.connect(URL, autocommit=True, connect_timeout=20)
except psycopg.Error as e:
    print(f"FAIL - connect over TLS as scram_user: {type(e).__name__}: {e}")
    print("python: 0 passed, 1 failed, 0 skipped (stopped: cannot connect)")
    sys.exit(1)


@check("connect over TLS as scram_user")
def _():
    expect(conn.pgconn.ssl_in_use, True, "ssl_in_use")
    row = conn.execute("SELECT current_user, current_database()").fetchone()
    expect(row, ("scram_user", "app"), "user/database")


@check("create table")
def _():
    conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2), data bytea)")


@check("insert and select (extended protocol, text and binary)")
def _():
    rows = [(1, "alice", Decimal("10.50"), b"\x00\x01"), (2, "bob", Decimal("20.25"), None), (3, "carol é", None, b"")]
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s)", rows)
        got = cur.execute(f"SELECT id, name, amount, data FROM {TABLE} ORDER BY id").fetchall()
        expect(got, rows, "text-format rows")
    with conn.cursor(binary=True) as cur:
        got = cur.execute(f"SELECT id, name, amount, data FROM {TABLE} ORDER BY id").fetchall()
        expect(got, rows, "binary-format rows")


@check("server-side prepared statement executed 6 times")
def _():
    with conn.cursor() as cur:
        for i in range(10, 16):
            cur.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (i, f"p{i}"), prepare=True)
        for i in range(10, 16):
            got = cur.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (i,), prepare=True).fetchone()
            expect(got, (f"p{i}",), f"row {i}")
        n = cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()[0]
        if n < 2:
            raise AssertionError(f"expected >= 2 protocol-level prepared statements on the server, got {n}")


@check("transaction rollback")
def _():
    with conn.transaction() as tx:
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (100, 'ghost')")
        expect(conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 100").fetchone()[0], 1, "inside tx")
        raise psycopg.Rollback(tx)
    expect(conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 100").fetchone()[0], 0, "after rollback")
    # And a non-autocommit connection with an explicit rollback().
    with psycopg.connect(URL, connect_timeout=20) as c2:
        c2.execute(f"INSERT INTO {TABLE} (id, name) VALUES (101, 'ghost2')")
        c2.rollback()
        expect(c2.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 101").fetchone()[0], 0, "after rollback()")


@check("COPY in and out")
def _():
    rows = [(i, f"copy row {i}", Decimal(f"{i}.25")) for i in range(1000, 1500)]
    with conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, name, amount) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        expect(cur.rowcount, 500, "copied row count")
        out = []
        with cur.copy(f"COPY (SELECT id, name, amount FROM {TABLE} WHERE id >= 1000 ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "numeric"])
            for r in copy.rows():
                out.append(r)
        expect(out, rows, "COPY TO STDOUT rows")
        # Binary COPY in and out too.
        brows = [(i, f"bin {i}", Decimal("1.00")) for i in range(2000, 2100)]
        with cur.copy(f"COPY {TABLE} (id, name, amount) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "numeric"])
            for r in brows:
                copy.write_row(r)
        bout = []
        with cur.copy(f"COPY (SELECT id, name, amount FROM {TABLE} WHERE id >= 2000 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "numeric"])
            bout = list(copy.rows())
        expect(bout, brows, "binary COPY rows")


def cancel_running_sleep(cancel):
    """Runs pg_sleep(30) on `conn`; once another connection sees it active,
    calls cancel(); expects QueryCanceled and a usable connection afterwards."""
    watcher_error = []

    def watcher():
        try:
            with psycopg.connect(URL, autocommit=True, connect_timeout=20) as w:
                deadline = time.monotonic() + 25
                while time.monotonic() < deadline:
                    n = w.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(30)%%'"
                        " AND usename = current_user AND pid <> pg_backend_pid()"
                    ).fetchone()[0]
                    if n > 0:
                        cancel()
                        return
                    time.sleep(0.05)
                watcher_error.append("pg_sleep(30) never showed up as active")
        except Exception as e:  # noqa: BLE001
            watcher_error.append(repr(e))

    t = threading.Thread(target=watcher)
    t.start()
    try:
        conn.execute("SELECT pg_sleep(30) AS slept")
    except errors.QueryCanceled:
        pass
    else:
        raise AssertionError(f"pg_sleep(30) finished without QueryCanceled ({watcher_error})")
    finally:
        t.join()
    if watcher_error:
        raise AssertionError(watcher_error[0])
    expect(conn.execute("SELECT 42").fetchone(), (42,), "connection usable after cancel")


@check("cancel with conn.cancel() -> QueryCanceled")
def _():
    cancel_running_sleep(conn.cancel)


if hasattr(conn, "cancel_safe"):

    @check("cancel with conn.cancel_safe() -> QueryCanceled")
    def _():
        cancel_running_sleep(conn.cancel_safe)

else:
    results["skipped"] += 1
    print("skip - cancel_safe: this psycopg has no cancel_safe()")


@check("drop table")
def _():
    conn.execute(f"DROP TABLE {TABLE}")
    expect(conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone(), (None,), "to_regclass")


conn.close()
print(f"python: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
sys.exit(1 if results["failed"] else 0)
