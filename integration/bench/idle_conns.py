"""Open N idle PostgreSQL connections and hold them until SIGTERM/SIGINT.

Used by integration/bench/run.sh to measure per-connection memory of
cmk-proxy and PgBouncer. Every connection completes the startup phase
(authentication through ReadyForQuery), runs `SELECT 1` and then stays idle; the tool prints
`READY <n> tls=<0|1>` once all are open (or `ERROR ...` and exits 1).

usage: idle_conns.py DSN COUNT [CONCURRENCY]
"""

import asyncio
import signal
import sys

import psycopg


async def main() -> int:
    dsn = sys.argv[1]
    count = int(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=60)
            # One query, so a pooler in session mode links a server connection
            # (PgBouncer assigns it at the first query, not at login).
            await conn.execute("SELECT 1")
            return conn

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    conns = [r for r in results if not isinstance(r, BaseException)]
    if errors:
        print(f"ERROR {len(errors)} of {count} connections failed; first: {errors[0]!r}", flush=True)
        for c in conns:
            await c.close()
        return 1
    idle = sum(1 for c in conns if c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
    tls = sum(1 for c in conns if c.pgconn.ssl_in_use)
    if idle != count:
        print(f"ERROR only {idle} of {count} connections are idle after startup", flush=True)
        return 1
    print(f"READY {count} tls={1 if tls == count else 0}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for c in conns:
        try:
            await c.close()
        except Exception:  # noqa: BLE001 - closing at exit, nothing to report
            pass
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
