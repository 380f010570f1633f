// node-postgres (pg) on encrypted columns through cmk-proxy (extended protocol,
// pg's default text parameters; Buffers go as binary parameters).
// Table `records` (created by the harness, see integration/README.md) has one
// protected column per declared type. For tenants acme and globex: insert rows
// covering every type (NULLs, unicode, 1 KiB text, negative and extreme
// numbers, BigInt, timestamptz with an offset and as a JS Date), read them
// back with pg's type parsers and as raw text, check the declared types in
// the result fields; update (tenant in WHERE; pinned to a session tenant set
// by startup option and by SET through a named statement); upsert with
// ON CONFLICT DO UPDATE SET c = EXCLUDED.c; named statements executed several
// times; ciphertext at rest through a direct connection; one KM003 refusal;
// JS Dates for date and timestamp columns too (node-pg sends them with the
// local offset, which PostgreSQL ignores for these types);
// then revoke globex: KM001 naming the tenant while acme keeps working on the
// same connection, and restore.
// Env: DATABASE_URL (proxy), PGSSLROOTCERT, CMK_DIRECT_URL, CMK_REVOKE_CMD,
// CMK_RESTORE_CMD, CMK_REVOKED_TENANT (globex), CMK_OTHER_TENANT (acme).
// Exits non-zero if any check fails; prints "node-encrypted: N passed, M failed, K skipped".
'use strict';

const fs = require('fs');
const { execSync } = require('child_process');
const { Client } = require('pg');

function env(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} must be set`);
    process.exit(2);
  }
  return v;
}

const url = env('DATABASE_URL');
const directUrl = env('CMK_DIRECT_URL');
const revokeCmd = env('CMK_REVOKE_CMD');
const restoreCmd = env('CMK_RESTORE_CMD');
const REVOKED = process.env.CMK_REVOKED_TENANT || 'globex';
const OTHER = process.env.CMK_OTHER_TENANT || 'acme';

function clientConfig(extra) {
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
    ...extra,
  };
}

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

// JSON with Buffers as hex, BigInts and Dates spelled out, so comparisons are exact.
function show(v) {
  return JSON.stringify(v, (k, x) => {
    if (typeof x === 'bigint') return `bigint:${x}`;
    if (x && x.type === 'Buffer' && Array.isArray(x.data)) return `hex:${Buffer.from(x.data).toString('hex')}`;
    return x;
  });
}

function expectEqual(got, want, what) {
  const g = show(got);
  const w = show(want);
  if (g !== w) throw new Error(`${what}:\n  expected ${w}\n  got      ${g}`);
}

async function expectError(promise, code, what) {
  try {
    await promise;
  } catch (e) {
    if (e.code !== code) throw new Error(`${what}: expected SQLSTATE ${code}, got ${e.code}: ${e.message}`);
    return e;
  }
  throw new Error(`${what}: expected SQLSTATE ${code}, but it succeeded`);
}

// ---- the data ---------------------------------------------------------------

const COLS = ['c_text', 'c_varchar', 'c_int2', 'c_int4', 'c_int8', 'c_numeric', 'c_float8', 'c_bool',
  'c_date', 'c_timestamp', 'c_timestamptz', 'c_uuid', 'c_jsonb', 'c_bytea'];
const OIDS = [25, 1043, 21, 23, 20, 1700, 701, 16, 1082, 1114, 1184, 2950, 3802, 17];
const SELECT = `SELECT id, tenant_id, label, ${COLS.join(', ')} FROM records`;
const INSERT = `INSERT INTO records (id, tenant_id, label, ${COLS.join(', ')}) VALUES (${
  Array.from({ length: 3 + COLS.length }, (_, i) => `$${i + 1}`).join(', ')})`;
let BIG = '';
for (let i = 0; i < 1024; i++) BIG += String.fromCharCode(65 + (i % 26));
const UUIDS = { acme: 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', globex: 'b1ffcd00-1d1c-4ef8-bb6d-6bb9bd380a22' };
const BASE = { acme: 0, globex: 10 };
const JSON_DOC = { name: 'Zoë', tags: ['a', 'b'], nested: { n: -1.5, ok: true, none: null } };
const fullText = (t) => `${t}: Zoë says 'hi' — 日本語 🐘 back\\slash`;
const MOON = new Date(Date.UTC(1969, 6, 21, 0, 17, 40));

// Parameters as a node app passes them.
function rowsFor(t) {
  const b = BASE[t];
  return [
    [b + 1, t, 'full', fullText(t), `${t} varchar ✓`, -32768, -2147483648, -9223372036854775808n,
      '-12345.678900', -0.1, true, '2024-02-29', '2024-02-29 23:59:59.123456', '2024-06-01T12:34:56.789+05:30',
      UUIDS[t], JSON_DOC, Buffer.from([0, 1, 0x7f, 0x80, 0xff, 0x43, 0x4d, 0x4b])],
    [b + 2, t, 'nulls', ...COLS.map(() => null)],
    [b + 3, t, 'extremes', BIG, '', 32767, 2147483647, 9223372036854775807n,
      '123456789012345678901234567890.000000001', 1e300, false, '1970-01-01', '2000-01-01 00:00:00', MOON,
      '00000000-0000-0000-0000-000000000000', JSON.stringify([1, 'two', null]), Buffer.alloc(0)],
  ];
}

// What pg's default type parsers give back (date/timestamp as local-time Dates, shown as ISO).
function parsedFor(t) {
  const b = BASE[t];
  const local = (y, m, d, hh = 0, mi = 0, ss = 0, ms = 0) => new Date(y, m - 1, d, hh, mi, ss, ms).toISOString();
  return [
    [b + 1, t, 'full', fullText(t), `${t} varchar ✓`, -32768, -2147483648, '-9223372036854775808',
      '-12345.678900', -0.1, true, local(2024, 2, 29), local(2024, 2, 29, 23, 59, 59, 123),
      '2024-06-01T07:04:56.789Z', UUIDS[t], JSON_DOC, Buffer.from([0, 1, 0x7f, 0x80, 0xff, 0x43, 0x4d, 0x4b])],
    [b + 2, t, 'nulls', ...COLS.map(() => null)],
    [b + 3, t, 'extremes', BIG, '', 32767, 2147483647, '9223372036854775807',
      '123456789012345678901234567890.000000001', 1e300, false, local(1970, 1, 1), local(2000, 1, 1),
      MOON.toISOString(), '00000000-0000-0000-0000-000000000000', [1, 'two', null], Buffer.alloc(0)],
  ];
}

// The exact text PostgreSQL prints for the same values (timestamptz in UTC).
function textFor(t) {
  const b = BASE[t];
  return [
    [`${b + 1}`, t, 'full', fullText(t), `${t} varchar ✓`, '-32768', '-2147483648', '-9223372036854775808',
      '-12345.678900', '-0.1', 't', '2024-02-29', '2024-02-29 23:59:59.123456', '2024-06-01 07:04:56.789+00',
      UUIDS[t], '{"name": "Zoë", "tags": ["a", "b"], "nested": {"n": -1.5, "ok": true, "none": null}}',
      '\\x00017f80ff434d4b'],
    [`${b + 2}`, t, 'nulls', ...COLS.map(() => null)],
    [`${b + 3}`, t, 'extremes', BIG, '', '32767', '2147483647', '9223372036854775807',
      '123456789012345678901234567890.000000001', '1e+300', 'f', '1970-01-01', '2000-01-01 00:00:00',
      '1969-07-21 00:17:40+00', '00000000-0000-0000-0000-000000000000', '[1, "two", null]', '\\x'],
  ];
}

const asShown = (rows) => rows.map((r) => r.map((v) => (v instanceof Date ? v.toISOString() : v)));
const rawText = { getTypeParser: () => (v) => v };

function run(cmd) {
  execSync(cmd, { stdio: ['ignore', 'pipe', 'pipe'], shell: '/bin/sh' });
}

async function poll(fn, wantError, what) {
  const deadline = Date.now() + 10000; // hang guard; approval_ttl is 1 s
  let last = 'never tried';
  for (;;) {
    try {
      await fn();
      if (!wantError) return null;
      last = 'still readable';
    } catch (e) {
      if (wantError) return e;
      last = e.message;
    }
    if (Date.now() > deadline) throw new Error(`${what}: still ${last}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function main() {
  const client = new Client(clientConfig({}));
  const direct = new Client({ connectionString: directUrl });
  for (const c of [client, direct]) {
    c.on('error', (e) => {
      counts.failed++;
      console.log(`FAIL - connection error event: ${e && e.stack ? e.stack : e}`);
    });
  }
  let connected = false;
  await check('connect over TLS as scram_user (and directly to PostgreSQL)', async () => {
    await client.connect();
    await direct.connect();
    connected = true;
    if (!client.connection.stream.encrypted) throw new Error('connection is not TLS');
  });
  if (!connected) return;

  await check('insert rows of every type for both tenants (RETURNING decrypted)', async () => {
    for (const t of ['acme', 'globex']) {
      for (const row of rowsFor(t)) {
        const r = await client.query({ text: `${INSERT} RETURNING id, c_int8, c_timestamptz, c_bytea`, values: row, rowMode: 'array' });
        const p = parsedFor(t).find((x) => x[0] === row[0]);
        expectEqual(asShown(r.rows), [[p[0], p[7], p[13], p[16]]], `RETURNING of row ${row[0]}`);
      }
    }
  });

  await check('read back exactly with pg type parsers; fields carry the declared types', async () => {
    for (const t of ['acme', 'globex']) {
      const r = await client.query({ text: `${SELECT} WHERE tenant_id = $1 ORDER BY id`, values: [t], rowMode: 'array' });
      expectEqual(r.fields.slice(3).map((f) => f.dataTypeID), OIDS, 'declared type OIDs');
      expectEqual(asShown(r.rows), asShown(parsedFor(t)), `${t} rows`);
    }
  });

  await check('read back exactly as raw text', async () => {
    for (const t of ['acme', 'globex']) {
      const r = await client.query({ text: `${SELECT} WHERE tenant_id = $1 ORDER BY id`, values: [t], rowMode: 'array', types: rawText });
      expectEqual(r.rows, textFor(t), `${t} rows as text`);
    }
  });

  await check('update with the tenant in WHERE', async () => {
    const r = await client.query('UPDATE records SET c_text = $1, c_bool = $2 WHERE id = $3 AND tenant_id = $4', ['acme updated ✓', false, 1, 'acme']);
    expectEqual(r.rowCount, 1, 'rowCount');
    const got = await client.query('SELECT c_text, c_bool, c_int4 FROM records WHERE id = $1', [1]);
    expectEqual(got.rows, [{ c_text: 'acme updated ✓', c_bool: false, c_int4: -2147483648 }], 'updated row');
  });

  await check('update pinned to the session tenant (startup options -c cmk.tenant_id=globex)', async () => {
    const c2 = new Client(clientConfig({ options: '-c cmk.tenant_id=globex' }));
    await c2.connect();
    try {
      const r = await c2.query('UPDATE records SET c_int4 = $1, c_numeric = $2 WHERE id = $3', [42, '0.5', 11]);
      expectEqual(r.rowCount, 1, 'rowCount');
      const got = await c2.query('SELECT c_int4, c_numeric, c_text FROM records WHERE id = $1', [11]);
      expectEqual(got.rows, [{ c_int4: 42, c_numeric: '0.5', c_text: fullText('globex') }], 'updated row');
    } finally {
      await c2.end();
    }
  });

  await check('SET cmk.tenant_id through a named statement; a row of another tenant is refused with KM004', async () => {
    const c2 = new Client(clientConfig({}));
    await c2.connect();
    try {
      await c2.query({ name: 'set_tenant_acme', text: "SET cmk.tenant_id = 'acme'" });
      await expectError(c2.query('INSERT INTO records (id, tenant_id, c_text) VALUES ($1, $2, $3)', [99, 'globex', 'wrong tenant']), 'KM004', 'globex row in an acme session');
      await c2.query('UPDATE records SET c_varchar = $1 WHERE id = $2', ['pinned to acme', 3]);
      const got = await c2.query('SELECT c_varchar FROM records WHERE id = $1', [3]);
      expectEqual(got.rows, [{ c_varchar: 'pinned to acme' }], 'row 3');
    } finally {
      await c2.end();
    }
  });

  await check('upsert: ON CONFLICT (id) DO UPDATE SET c = EXCLUDED.c (conflicting and new row)', async () => {
    const sql = 'INSERT INTO records (id, tenant_id, c_text, c_numeric, c_timestamptz) VALUES ($1, $2, $3, $4, $5) '
      + 'ON CONFLICT (id) DO UPDATE SET c_text = EXCLUDED.c_text, c_numeric = EXCLUDED.c_numeric, c_timestamptz = EXCLUDED.c_timestamptz';
    const when = new Date(Date.UTC(2025, 0, 2, 3, 4, 5, 678));
    await client.query(sql, [1, 'acme', 'upserted ✓', '1.50', when]);
    await client.query(sql, [4, 'acme', 'new via upsert', '2', null]);
    const got = await client.query({ text: 'SELECT id, c_text, c_numeric, c_timestamptz, c_int2, c_bool FROM records WHERE id IN (1, 4) ORDER BY id', rowMode: 'array' });
    expectEqual(asShown(got.rows), [[1, 'upserted ✓', '1.50', when.toISOString(), -32768, false], [4, 'new via upsert', '2', null, null, null]], 'upserted rows');
  });

  await check('named prepared statements executed 6 times each', async () => {
    const ins = 'INSERT INTO records (id, tenant_id, c_text, c_int8, c_timestamptz, c_float8, c_jsonb) VALUES ($1, $2, $3, $4, $5, $6, $7)';
    const base = Date.UTC(2025, 0, 2, 3, 4, 5);
    for (let i = 100; i < 106; i++) {
      const t = i % 2 ? 'acme' : 'globex';
      await client.query({ name: 'enc_ins', text: ins, values: [i, t, `prepared ${i} ü`, BigInt(i) * 1000000000000n, new Date(base + i * 60000), i / 8, { i }] });
    }
    for (let i = 100; i < 106; i++) {
      const r = await client.query({ name: 'enc_sel', text: 'SELECT c_text, c_int8, c_timestamptz, c_float8, c_jsonb FROM records WHERE id = $1', values: [i], rowMode: 'array' });
      expectEqual(asShown(r.rows), [[`prepared ${i} ü`, `${i}000000000000`, new Date(base + i * 60000).toISOString(), i / 8, { i }]], `row ${i}`);
    }
    const ps = await client.query("SELECT name FROM pg_prepared_statements WHERE name IN ('enc_ins', 'enc_sel') ORDER BY name");
    expectEqual(ps.rows.map((r) => r.name), ['enc_ins', 'enc_sel'], 'server-side prepared statements');
  });

  await check('JS Date objects for date and timestamp columns (sent as local time with an offset)', async () => {
    const day = new Date(2024, 1, 29);
    const wall = new Date(2000, 0, 1, 12, 30, 15, 250);
    await client.query('INSERT INTO records (id, tenant_id, c_date, c_timestamp) VALUES ($1, $2, $3, $4)', [200, 'acme', day, wall]);
    const r = await client.query({ text: 'SELECT c_date, c_timestamp FROM records WHERE id = $1', values: [200], rowMode: 'array' });
    expectEqual(asShown(r.rows), [[day.toISOString(), wall.toISOString()]], 'parsed');
    const t = await client.query({ text: 'SELECT c_date, c_timestamp FROM records WHERE id = $1', values: [200], rowMode: 'array', types: rawText });
    const pad = (n) => String(n).padStart(2, '0');
    expectEqual(t.rows, [['2024-02-29', `2000-01-01 ${pad(wall.getHours())}:30:15.25`]], 'as text');
  });

  await check('at rest (direct connection): every cell an envelope, EDEK and blind index set, NULLs stay NULL', async () => {
    const cells = COLS.map((c) => `(${c})`).join(', ');
    const r = await direct.query(`SELECT count(cell)::int AS total, (count(*) FILTER (WHERE substr(cell, 1, 4) = '\\x434d4b01'::bytea))::int AS envelopes FROM records, LATERAL (VALUES ${cells}) AS v(cell)`);
    if (r.rows[0].total < 50) throw new Error(`only ${r.rows[0].total} cells at rest`);
    expectEqual(r.rows[0].envelopes, r.rows[0].total, 'cells starting with CMK\\x01');
    const bad = await direct.query(`SELECT id FROM records WHERE (num_nonnulls(${COLS.join(', ')}) > 0 AND (cmk_edek IS NULL OR jsonb_typeof(cmk_edek) <> 'object' OR cmk_edek = '{}')) OR (c_text IS NULL) <> (c_text_bidx IS NULL)`);
    expectEqual(bad.rows, [], 'rows without EDEK or with a missing blind index');
    const nulls = await direct.query(`SELECT num_nulls(${COLS.join(', ')}) AS n FROM records WHERE id IN (2, 12) ORDER BY id`);
    expectEqual(nulls.rows, [{ n: 14 }, { n: 14 }], 'NULL cells');
    const raw = await direct.query({ text: `SELECT ${COLS.join(', ')} FROM records`, rowMode: 'array' });
    const secrets = ['Zoë', 'varchar ✓', '12345.6789', '2024-02-29', UUIDS.acme, 'nested', BIG.slice(0, 16)].map((s) => Buffer.from(s))
      .concat([Buffer.from([0, 1, 0x7f, 0x80, 0xff])]);
    for (const row of raw.rows) {
      for (const cell of row) {
        if (cell === null) continue;
        if (!Buffer.isBuffer(cell)) throw new Error(`cell at rest is not bytea: ${cell}`);
        for (const s of secrets) if (cell.includes(s)) throw new Error(`plaintext ${s} at rest`);
      }
    }
  });

  await check('KM003 for WHERE on a protected column (names table and column); the connection stays usable', async () => {
    const e = await expectError(client.query('SELECT id FROM records WHERE c_int4 = $1', [42]), 'KM003', 'WHERE c_int4 = $1');
    if (!e.message.includes('public.records') || !e.message.includes('c_int4')) throw new Error(`message does not name table and column: ${e.message}`);
    const r = await client.query('SELECT count(*)::int AS n FROM records WHERE id < $1', [50]);
    expectEqual(r.rows, [{ n: 7 }], 'usable after KM003');
  });

  await check('equality lookup on the searchable c_text through the blind index: tenant in WHERE, = ANY', async () => {
    for (const tenant of ['acme', 'globex']) {
      const stored = (await client.query('SELECT id, c_text FROM records WHERE tenant_id = $1', [tenant])).rows;
      const texts = [...new Set(stored.filter((r) => r.c_text !== null).map((r) => r.c_text))].sort();
      for (const text of texts) {
        const want = stored.filter((r) => r.c_text === text).map((r) => r.id).sort((a, b) => a - b);
        const got = (await client.query('SELECT id FROM records WHERE tenant_id = $1 AND c_text = $2 ORDER BY id', [tenant, text])).rows.map((r) => r.id);
        expectEqual(got, want, `${tenant}: c_text = $2`);
      }
      const any = (await client.query('SELECT id FROM records WHERE tenant_id = $1 AND c_text = ANY($2) ORDER BY id', [tenant, texts])).rows.map((r) => r.id);
      expectEqual(any, stored.filter((r) => r.c_text !== null).map((r) => r.id).sort((a, b) => a - b), `${tenant}: c_text = ANY($2)`);
      const none = await client.query('SELECT count(*)::int AS n FROM records WHERE tenant_id = $1 AND c_text = $2', [tenant, 'no such value']);
      expectEqual(none.rows, [{ n: 0 }], 'a value no row has');
    }
  });

  await check('KM003 inside a transaction fails the server transaction too: COMMIT keeps nothing of it', async () => {
    await client.query('BEGIN');
    await client.query('INSERT INTO records (id, tenant_id, c_text) VALUES ($1, $2, $3)', [300, 'acme', 'half of the work']);
    await expectError(client.query('SELECT id FROM records WHERE c_int4 = $1', [1]), 'KM003', 'WHERE c_int4 = $1');
    await expectError(client.query('SELECT 1'), '25P02', 'statement after KM003 in the transaction');
    await client.query('COMMIT');
    const r = await direct.query('SELECT count(*)::int AS n FROM records WHERE id = 300');
    expectEqual(r.rows, [{ n: 0 }], 'rows of the failed transaction');
  });

  const readTenant = (t) => client.query({ name: 'enc_read_tenant', text: `${SELECT} WHERE tenant_id = $1 AND id < 50 ORDER BY id`, values: [t], rowMode: 'array' });

  await check(`revoke ${REVOKED}: KM001 naming the tenant; ${OTHER} keeps reading and writing on the same connection`, async () => {
    run(revokeCmd);
    const e = await poll(() => readTenant(REVOKED), true, `${REVOKED} reads after revocation`);
    if (e.code !== 'KM001') throw new Error(`expected KM001, got ${e.code}: ${e.message}`);
    if (!e.message.includes(REVOKED)) throw new Error(`KM001 message does not name ${REVOKED}: ${e.message}`);
    await expectError(client.query(`${SELECT} WHERE id = $1`, [13]), 'KM001', 'unnamed read of a revoked row');
    const mine = await readTenant(OTHER);
    expectEqual(mine.rows.length, 4, `${OTHER} rows`);
    await client.query('INSERT INTO records (id, tenant_id, c_text) VALUES ($1, $2, $3)', [5, OTHER, 'written while revoked']);
    const got = await client.query('SELECT c_text FROM records WHERE id = $1', [5]);
    expectEqual(got.rows, [{ c_text: 'written while revoked' }], 'new row');
    await expectError(client.query('INSERT INTO records (id, tenant_id, c_text) VALUES ($1, $2, $3)', [15, REVOKED, 'refused']), 'KM001', 'write of the revoked tenant');
  });

  await check(`restore ${REVOKED}: its rows read again`, async () => {
    run(restoreCmd);
    await poll(() => readTenant(REVOKED), false, `${REVOKED} reads after restore`);
    const r = await readTenant(REVOKED);
    expectEqual(r.rows[0][3], fullText(REVOKED), 'c_text of the first row');
  });

  await client.end();
  await direct.end();
}

main()
  .catch((e) => {
    counts.failed++;
    console.log(`FAIL - unexpected: ${e && e.stack ? e.stack : e}`);
  })
  .finally(() => {
    console.log(`node-encrypted: ${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`);
    process.exit(counts.failed ? 1 : 0);
  });
