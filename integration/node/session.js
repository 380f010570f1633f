// node-postgres (pg) session through cmk-proxy: TLS (CA from PGSSLROOTCERT) +
// SCRAM, DDL, parameterised insert/select, named (server-side) prepared
// statement executed several times, rollback, drop.
// COPY is skipped (node-postgres needs the separate pg-copy-streams package);
// cancel is skipped (node-postgres has no public cancel API).
// Env: DATABASE_URL (sslmode=verify-full|require), PGSSLROOTCERT.
// Exits non-zero if any check fails; prints "node: N passed, M failed, K skipped".
'use strict';

const fs = require('fs');
const { Client } = require('pg');

const url = process.env.DATABASE_URL;
if (!url) {
  console.error('DATABASE_URL must be set');
  process.exit(2);
}

function clientConfig() {
  const u = new URL(url);
  const mode = u.searchParams.get('sslmode') || 'prefer';
  const ca = process.env.PGSSLROOTCERT ? fs.readFileSync(process.env.PGSSLROOTCERT) : undefined;
  let ssl;
  if (mode === 'disable') {
    ssl = false;
  } else if (mode === 'verify-full' || mode === 'verify-ca') {
    ssl = { ca, rejectUnauthorized: true };
  } else {
    ssl = { rejectUnauthorized: false };
  }
  return {
    host: u.hostname,
    port: Number(u.port || 5432),
    user: decodeURIComponent(u.username),
    password: decodeURIComponent(u.password),
    database: decodeURIComponent(u.pathname.replace(/^\//, '')),
    ssl,
    connectionTimeoutMillis: 20000,
  };
}

const table = `node_t_${process.pid}_${Date.now() % 100000}`;
const counts = { passed: 0, failed: 0, skipped: 0 };

async function check(name, fn) {
  try {
    await fn();
    counts.passed++;
    console.log(`ok   - ${name}`);
  } catch (e) {
    counts.failed++;
    console.log(`FAIL - ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

function skip(name, why) {
  counts.skipped++;
  console.log(`skip - ${name}: ${why}`);
}

function expectEqual(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: expected ${w}, got ${g}`);
}

async function main() {
  const client = new Client(clientConfig());
  client.on('error', (e) => {
    counts.failed++;
    console.log(`FAIL - connection error event: ${e && e.stack ? e.stack : e}`);
  });
  let connected = false;
  await check('connect over TLS as scram_user', async () => {
    await client.connect();
    connected = true;
    const stream = client.connection.stream;
    if (clientConfig().ssl && !stream.encrypted) throw new Error('connection is not TLS');
    const r = await client.query('SELECT current_user AS u, current_database() AS d');
    expectEqual(r.rows, [{ u: 'scram_user', d: 'app' }], 'user/database');
  });
  if (!connected) return;

  await check('create table', async () => {
    await client.query(`CREATE TABLE ${table} (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2), data bytea)`);
  });

  await check('insert and select (extended protocol)', async () => {
    const rows = [
      [1, 'alice', '10.50', Buffer.from([0, 1])],
      [2, 'bob', '20.25', null],
      [3, 'carol é', null, Buffer.alloc(0)],
    ];
    for (const r of rows) {
      await client.query(`INSERT INTO ${table} VALUES ($1, $2, $3, $4)`, r);
    }
    const res = await client.query({ text: `SELECT id, name, amount, data FROM ${table} ORDER BY id`, rowMode: 'array' });
    expectEqual(
      res.rows.map((r) => [r[0], r[1], r[2], r[3] === null ? null : r[3].toString('hex')]),
      rows.map((r) => [r[0], r[1], r[2], r[3] === null ? null : r[3].toString('hex')]),
      'rows',
    );
    const simple = await client.query(`SELECT count(*)::int AS n FROM ${table}`);
    expectEqual(simple.rows, [{ n: 3 }], 'simple-protocol count');
  });

  await check('named prepared statement executed 6 times', async () => {
    for (let i = 10; i < 16; i++) {
      await client.query({ name: 'node_ins', text: `INSERT INTO ${table} (id, name) VALUES ($1, $2)`, values: [i, `p${i}`] });
    }
    for (let i = 10; i < 16; i++) {
      const r = await client.query({ name: 'node_sel', text: `SELECT name FROM ${table} WHERE id = $1`, values: [i] });
      expectEqual(r.rows, [{ name: `p${i}` }], `row ${i}`);
    }
    const ps = await client.query(
      "SELECT name FROM pg_prepared_statements WHERE name IN ('node_ins', 'node_sel') AND NOT from_sql ORDER BY name",
    );
    expectEqual(ps.rows.map((r) => r.name), ['node_ins', 'node_sel'], 'server-side prepared statements');
  });

  await check('transaction rollback', async () => {
    await client.query('BEGIN');
    await client.query(`INSERT INTO ${table} (id, name) VALUES (100, 'ghost')`);
    const inside = await client.query(`SELECT count(*)::int AS n FROM ${table} WHERE id = 100`);
    expectEqual(inside.rows, [{ n: 1 }], 'inside transaction');
    await client.query('ROLLBACK');
    const after = await client.query(`SELECT count(*)::int AS n FROM ${table} WHERE id = 100`);
    expectEqual(after.rows, [{ n: 0 }], 'after rollback');
  });

  await check('error then recovery', async () => {
    let code = null;
    try {
      await client.query('SELECT 1/0');
    } catch (e) {
      code = e.code;
    }
    expectEqual(code, '22012', 'division_by_zero SQLSTATE');
    const r = await client.query('SELECT 7 AS n');
    expectEqual(r.rows, [{ n: 7 }], 'usable after error');
  });

  skip('COPY in/out', 'node-postgres needs pg-copy-streams for COPY; not a dependency here');
  skip('cancel', 'node-postgres has no public cancel API');

  await check('drop table', async () => {
    await client.query(`DROP TABLE ${table}`);
    const r = await client.query('SELECT to_regclass($1) AS t', [table]);
    expectEqual(r.rows, [{ t: null }], 'to_regclass');
  });

  await client.end();
}

main()
  .catch((e) => {
    counts.failed++;
    console.log(`FAIL - unexpected: ${e && e.stack ? e.stack : e}`);
  })
  .finally(() => {
    console.log(`node: ${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`);
    process.exit(counts.failed ? 1 : 0);
  });
