// bench/consistency/check.js -- the stale-cache checker (run by run.sh,
// which starts PostgreSQL with cachekit and Redis and sets PG* and
// REDIS_PORT).
//
// For each mode (invalidation, write-through), reader kind (plain SETEX
// fills; plain fills with cachekit.redelete_after; fetch() with leases),
// fill delay and run: N writers run UPDATE items SET v = v + 1 on random
// rows and M cache-aside readers read random rows through Redis for
// SECONDS; then everything stops, cachekit_wait() waits for delivery (and,
// with redelete_after, the delay passes), and every cache entry is compared
// with its row: an entry whose version is older than the row's is stale.
// During the load, one write in PROBE_EVERY is probed 10 ms, 100 ms and
// 1 s after its COMMIT returned: is its key still holding an older version?
// A probe that finds one asks the queue whether the write is delivered yet:
// if an entry enqueued no later than the write's transaction still waits,
// the write may not be delivered, and the probe counts as "undelivered"
// (delivery lag, not a stale fill); otherwise it counts as stale.
//
// One JSON line per run goes to RESULTS_FILE (if set); the table goes to stdout.

'use strict';

const { Client } = require('pg');
const Redis = require('ioredis');
const { fetch, decode } = require('../../clients/node');

const env = process.env;
const list = (v, d) => (v || d).split(/[\s,]+/).filter(Boolean);
const num = (v, d) => (v === undefined || v === '' ? d : Number(v));
const cfg = {
  modes: list(env.MODES, 'invalidation write_through'),
  kinds: list(env.KINDS, 'plain redelete lease'),
  delays: list(env.DELAYS, '0 2 20 200').map(Number),
  runs: num(env.RUNS, 5),
  seconds: num(env.SECONDS, 15),
  writers: num(env.WRITERS, 4),
  readers: num(env.READERS, 8),
  rows: num(env.ROWS, 2000),
  redeleteAfter: env.REDELETE_AFTER || '500ms',
  probeEvery: num(env.PROBE_EVERY, 10),
  readerPause: num(env.READER_PAUSE_MS, 1),
  ttl: 300,
};
const PROBES = [10, 100, 1000];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const key = (id) => `item:${id}`;
const pick = () => 1 + Math.floor(Math.random() * cfg.rows);

function redisClient() {
  return new Redis({ host: '127.0.0.1', port: Number(env.REDIS_PORT), enableAutoPipelining: false });
}

async function pgClient() {
  const c = new Client();
  await c.connect();
  return c;
}

function redeleteMs() {
  const m = /^(\d+)\s*(ms|s)?$/.exec(cfg.redeleteAfter);
  if (!m) throw new Error(`REDELETE_AFTER must be like 500ms or 2s, not ${cfg.redeleteAfter}`);
  return Number(m[1]) * (m[2] === 's' ? 1000 : 1);
}

// the table, its trigger for the mode, and the redelete setting for the kind
async function setUp(admin, mode, kind) {
  await admin.query(`CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v bigint NOT NULL)`);
  await admin.query(`INSERT INTO items SELECT g, 0 FROM generate_series(1, ${cfg.rows}) g ON CONFLICT DO NOTHING`);
  await admin.query('DROP TRIGGER IF EXISTS items_cache ON items');
  const fn = mode === 'invalidation'
    ? "cachekit_invalidate('item:{id}')"
    : `cachekit_write_through('key=item:{id}', 'ttl=${cfg.ttl}', 'columns=id,v')`;
  await admin.query(`CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items FOR EACH ROW EXECUTE FUNCTION ${fn}`);
  if (kind === 'redelete') await admin.query(`ALTER SYSTEM SET cachekit.redelete_after = '${cfg.redeleteAfter}'`);
  else await admin.query('ALTER SYSTEM RESET cachekit.redelete_after');
  await admin.query('SELECT pg_reload_conf()');
  await admin.query("SELECT cachekit_wait('60 seconds')");
  await sleep(300); // the worker reloads at its next wake-up
}

// one writer: UPDATE random rows; probe some writes' keys later
function writer(state, pg, redis, admin) {
  return (async () => {
    while (!state.stop) {
      const id = pick();
      const r = await pg.query('UPDATE items SET v = v + 1 WHERE id = $1 RETURNING v, now()::text AS t', [id]);
      state.writes++;
      if (state.writes % cfg.probeEvery !== 0) continue;
      const v = Number(r.rows[0].v);
      const t = r.rows[0].t;
      for (const [i, ms] of PROBES.entries()) {
        state.pending++;
        setTimeout(async () => {
          try {
            const cached = decode(await redis.get(key(id)));
            state.probes[i]++;
            if (cached === undefined || Number(cached.v) >= v) return;
            // asked after the GET: still waiting now means waiting at the GET
            const q = await admin.query(
              'SELECT coalesce(min(enqueued_at) <= $1::timestamptz, false) AS waiting FROM cachekit_queue', [t]);
            if (q.rows[0].waiting) state.undelivered[i]++;
            else state.staleProbes[i]++;
          } finally {
            state.pending--;
          }
        }, ms);
      }
    }
  })();
}

// one cache-aside reader of the given kind
function reader(state, pg, redis, kind, delay) {
  const load = async (id) => {
    const r = await pg.query('SELECT id, v FROM items WHERE id = $1', [id]);
    if (delay > 0) await sleep(delay);
    return { id: r.rows[0].id, v: Number(r.rows[0].v) };
  };
  return (async () => {
    while (!state.stop) {
      if (cfg.readerPause > 0) await sleep(cfg.readerPause);
      const id = pick();
      state.reads++;
      if (kind === 'lease') {
        await fetch(redis, key(id), () => { state.loads++; return load(id); }, { ttl: cfg.ttl });
        continue;
      }
      if (decode(await redis.get(key(id))) !== undefined) continue;
      state.loads++;
      const row = await load(id);
      await redis.set(key(id), JSON.stringify(row), 'EX', cfg.ttl);
    }
  })();
}

// the age of the oldest undelivered queue entry, sampled every 250 ms: how
// far delivery lags (a probe of a write not yet delivered finds the old value)
function lagMonitor(state, admin) {
  state.maxLagMs = 0;
  return (async () => {
    while (!state.stop) {
      const r = await admin.query(
        'SELECT coalesce(1000 * extract(epoch FROM clock_timestamp() - oldest_enqueued_at), 0) AS ms FROM cachekit_stats');
      state.maxLagMs = Math.max(state.maxLagMs, Number(r.rows[0].ms));
      await sleep(250);
    }
  })();
}

// compare every cache entry with its row
async function countStale(admin, redis) {
  const rows = (await admin.query('SELECT id, v FROM items ORDER BY id')).rows;
  let stale = 0; let cached = 0; let newer = 0;
  for (let i = 0; i < rows.length; i += 500) {
    const part = rows.slice(i, i + 500);
    const raws = await redis.mget(part.map((r) => key(r.id)));
    part.forEach((r, j) => {
      const c = decode(raws[j]);
      if (c === undefined) return;
      cached++;
      if (Number(c.v) < Number(r.v)) stale++;
      if (Number(c.v) > Number(r.v)) newer++;
    });
  }
  return { stale, cached, newer };
}

async function oneRun(admin, mode, kind, delay, run) {
  const redis = redisClient();
  await redis.flushdb();
  const state = {
    stop: false, writes: 0, reads: 0, loads: 0, pending: 0,
    probes: PROBES.map(() => 0), staleProbes: PROBES.map(() => 0), undelivered: PROBES.map(() => 0),
  };
  const pgs = await Promise.all(Array.from({ length: cfg.writers + cfg.readers }, pgClient));
  const rs = Array.from({ length: cfg.writers + cfg.readers }, redisClient);
  const tasks = [];
  for (let i = 0; i < cfg.writers; i++) tasks.push(writer(state, pgs[i], rs[i], admin));
  for (let i = cfg.writers; i < pgs.length; i++) tasks.push(reader(state, pgs[i], rs[i], kind, delay));
  const lag = lagMonitor(state, admin);
  await sleep(cfg.seconds * 1000);
  state.stop = true;
  await Promise.all(tasks); // in-flight fills finish
  await lag;
  const wait = await admin.query("SELECT cachekit_wait('120 seconds') AS ok");
  if (!wait.rows[0].ok) throw new Error('cachekit_wait timed out');
  if (kind === 'redelete') await sleep(redeleteMs() + 1000);
  while (state.pending > 0) await sleep(50);
  const q = await countStale(admin, redis);
  await Promise.all(pgs.map((c) => c.end()));
  rs.forEach((r) => r.disconnect());
  redis.disconnect();
  return {
    mode, kind, delay, run, seconds: cfg.seconds, writes: state.writes, reads: state.reads, loads: state.loads,
    cached: q.cached, stale: q.stale, newer: q.newer,
    probes: state.probes, stale_probes: state.staleProbes, undelivered_probes: state.undelivered,
    max_lag_ms: Math.round(state.maxLagMs),
  };
}

function pad(s, n, right) {
  s = String(s);
  return right ? s.padEnd(n) : s.padStart(n);
}

function table(results) {
  const lines = [];
  const head = ['mode', 'reader', 'delay', 'runs', 'writes', 'stale@quiescence', 'per 10k writes', 'stale probes 10ms', '100ms', '1s', 'max lag'];
  const w = [13, 20, 6, 5, 8, 18, 15, 18, 16, 16, 8];
  lines.push(head.map((h, i) => pad(h, w[i], i < 2)).join(' '));
  lines.push(w.map((n) => '-'.repeat(n)).join(' '));
  const groups = new Map();
  for (const r of results) {
    const g = `${r.mode}|${r.kind}|${r.delay}`;
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(r);
  }
  for (const rs of groups.values()) {
    const f = rs[0];
    const writes = rs.reduce((a, r) => a + r.writes, 0);
    const stale = rs.map((r) => r.stale);
    const total = stale.reduce((a, b) => a + b, 0);
    const sum = (f) => rs.reduce((a, r) => a + f(r), 0);
    const pr = (i) => {
      const u = sum((r) => r.undelivered_probes[i]);
      return `${sum((r) => r.stale_probes[i])}/${sum((r) => r.probes[i])}${u ? ` +${u}u` : ''}`;
    };
    const kind = f.kind === 'redelete' ? `plain+redelete ${cfg.redeleteAfter}` : f.kind === 'lease' ? 'fetch (lease)' : 'plain SETEX';
    lines.push([f.mode, kind, `${f.delay}ms`, rs.length, writes, `${total} (${stale.join(',')})`,
      (total * 10000 / Math.max(writes, 1)).toFixed(2), pr(0), pr(1), pr(2),
      `${Math.max(...rs.map((r) => r.max_lag_ms))}ms`].map((v, i) => pad(v, w[i], i < 2)).join(' '));
  }
  return lines.join('\n');
}

async function main() {
  const admin = await pgClient();
  const results = [];
  const out = env.RESULTS_FILE ? require('fs').createWriteStream(env.RESULTS_FILE, { flags: 'a' }) : null;
  for (const mode of cfg.modes) {
    for (const kind of cfg.kinds) {
      await setUp(admin, mode, kind);
      for (const delay of cfg.delays) {
        for (let run = 1; run <= cfg.runs; run++) {
          const r = await oneRun(admin, mode, kind, delay, run);
          results.push(r);
          if (out) out.write(JSON.stringify(r) + '\n');
          process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${mode} ${kind} delay=${delay}ms run ${run}: `
            + `${r.writes} writes, ${r.reads} reads, ${r.loads} loads, ${r.cached} cached, ${r.stale} stale, `
            + `stale probes ${r.stale_probes.join('/')} of ${r.probes.join('/')} `
            + `(+${r.undelivered_probes.join('/')} undelivered), max lag ${r.max_lag_ms} ms\n`);
        }
      }
    }
  }
  await admin.query('ALTER SYSTEM RESET cachekit.redelete_after');
  await admin.query('SELECT pg_reload_conf()');
  await admin.end();
  if (out) out.end();
  console.log(`cachekit consistency check: ${cfg.rows} rows, ${cfg.writers} writers, ${cfg.readers} readers, `
    + `${cfg.seconds}s per run, readers pause ${cfg.readerPause} ms between reads; probes every ${cfg.probeEvery}th write`);
  console.log(table(results));
  console.log('stale probes: stale/probed at 10 ms, 100 ms, 1 s after the write; +Nu: N more found an older'
    + ' version while the write was still undelivered (delivery lag, not a stale fill)');
}

main().catch((err) => { console.error(err); process.exit(1); });
