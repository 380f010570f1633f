"""psycopg 3 `cursor.copy()` through cmk-proxy on a protected table, both
ways: rows written with `write_row` (psycopg's text format) come back
equal from `COPY ... TO STDOUT` with `rows()`, and equal to what the same
COPY gives on a plaintext table straight from PostgreSQL.

Usage: copy.py PROXY_URL DIRECT_URL  (database with tables patients and plain)
"""

import sys
import datetime

import psycopg

ROWS = [
    (1, "acme", "123-45-6789", datetime.date(1980, 1, 2), "tab\there"),
    (2, "globex", None, None, ""),
    (3, "acme", "555", datetime.date(2000, 2, 29), "multi\nline \\ \u00e9 \U0001f511"),
]
FIELDS = "id, tenant_id, ssn, birth_date, notes"


def load_and_read(url, table):
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} ({FIELDS}) FROM STDIN") as copy:
                for row in ROWS:
                    copy.write_row(row)
            out = []
            with cur.copy(f"COPY (SELECT {FIELDS} FROM {table} ORDER BY id) TO STDOUT") as copy:
                for row in copy.rows():
                    out.append(row)
            with cur.copy(f"COPY (SELECT {FIELDS} FROM {table} ORDER BY id) TO STDOUT (FORMAT csv)") as copy:
                csv = b"".join(bytes(block) for block in copy)
            return out, csv


def main():
    proxy_url, direct_url = sys.argv[1], sys.argv[2]
    through, through_csv = load_and_read(proxy_url, "patients")
    direct, direct_csv = load_and_read(direct_url, "plain")
    assert through == direct, (through, direct)
    assert through_csv == direct_csv, (through_csv, direct_csv)
    with psycopg.connect(direct_url) as conn:
        sealed = conn.execute(
            "SELECT count(*) FROM patients WHERE substr(notes, 1, 4) = '\\x434d4b01'::bytea"
        ).fetchone()[0]
        assert sealed == len(ROWS), sealed
    print("psycopg copy ok")


if __name__ == "__main__":
    main()
