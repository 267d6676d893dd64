'use strict';
// bench/node/latency.js -- COMMIT-to-key-gone latency of a cachekit trigger.
//
// One process, one clock (process.hrtime): for each sample it SETs
// user:<id> in Redis, runs an autocommit UPDATE of that row (so the reply
// to the query is the COMMIT returning), and waits for Redis' keyspace
// notification "del" of user:<id> on a second connection. The sample is
// (time the del event reached us) - (time COMMIT returned). A negative
// value means the event was read first: the worker was quicker than the
// reply to the client.
//
// Prints key=value lines (milliseconds) on stdout; RAW_FILE, if set, gets
// every sample in microseconds, one per line.
//
// Environment: PGHOST PGPORT PGUSER PGDATABASE (read by pg), REDIS_PORT,
// SAMPLES (1000), WARMUP (20), ID_FIRST, ID_LAST (ids to update, a range the
// background load does not touch), MAX_GAP_MS (5: random pause between
// samples), TIMEOUT_MS (2000), RAW_FILE. REDIS_CLUSTER_PORTS (comma list of
// a Redis Cluster's primaries, instead of REDIS_PORT): keys are SET through
// the cluster and notifications heard on every primary.

const fs = require('fs');
const { Client } = require('pg');
const Redis = require('ioredis');

const samples = Number(process.env.SAMPLES || 1000);
const warmup = Number(process.env.WARMUP || 20);
const idFirst = Number(process.env.ID_FIRST || 99001);
const idLast = Number(process.env.ID_LAST || 100000);
const maxGapMs = Number(process.env.MAX_GAP_MS || 5);
const timeoutMs = Number(process.env.TIMEOUT_MS || 2000);
const redisPort = Number(process.env.REDIS_PORT);
const clusterPorts = (process.env.REDIS_CLUSTER_PORTS || '').split(',').filter(Boolean).map(Number);
if (!redisPort && clusterPorts.length === 0) {
  console.error('latency: REDIS_PORT must be set');
  process.exit(2);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => process.hrtime.bigint();

function percentile(sorted, p) {
  // nearest rank
  const rank = Math.max(1, Math.ceil(p * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

async function main() {
  const ports = clusterPorts.length ? clusterPorts : [redisPort];
  const nodes = ports.map((port) => new Redis({ host: '127.0.0.1', port }));
  // a key's node in a cluster: asked once, then remembered (MOVED names it)
  const nodeOf = new Map();
  const setCached = async (key) => {
    const node = nodeOf.get(key) || nodes[0];
    try {
      await node.set(key, 'cached');
    } catch (err) {
      const moved = /^MOVED \d+ [^ ]*:(\d+)$/.exec(err.message);
      if (!moved) throw err;
      nodeOf.set(key, nodes[ports.indexOf(Number(moved[1]))]);
      await nodeOf.get(key).set(key, 'cached');
    }
  };
  const pg = new Client();
  await pg.connect();

  const before = await nodes[0].config('GET', 'notify-keyspace-events');
  const previousFlags = before[1] || '';
  // K: keyspace channel, g: generic commands (DEL, UNLINK, ...)
  for (const n of nodes) await n.config('SET', 'notify-keyspace-events', 'Kg');

  const prefix = '__keyspace@0__:';
  const waiters = new Map(); // key -> { resolve }
  const onMessage = (pattern, channel, message) => {
    const t = now();
    if (message !== 'del') return;
    const w = waiters.get(channel.slice(prefix.length));
    if (w) {
      waiters.delete(channel.slice(prefix.length));
      w.resolve(t);
    }
  };
  const subs = ports.map((port) => new Redis({ host: '127.0.0.1', port }));
  for (const sub of subs) {
    sub.on('pmessage', onMessage);
    await sub.psubscribe(prefix + 'user:*');
  }

  const update = {
    name: 'lat_update',
    text: "UPDATE users SET name = name || '', updated_at = now() WHERE id = $1",
    values: [0],
  };

  const lat = [];   // ns, COMMIT returned -> del seen
  const e2e = [];   // ns, UPDATE sent -> del seen
  let timeouts = 0;

  for (let i = 0; i < warmup + samples; i++) {
    const id = idFirst + Math.floor(Math.random() * (idLast - idFirst + 1));
    const key = `user:${id}`;
    await setCached(key);

    let timer;
    const seen = new Promise((resolve) => {
      waiters.set(key, { resolve });
      timer = setTimeout(() => resolve(null), timeoutMs);
    });

    const tSend = now();
    update.values = [id];
    const res = await pg.query(update);
    const tCommit = now();
    if (res.rowCount !== 1) throw new Error(`UPDATE of id ${id} changed ${res.rowCount} rows`);

    const tGone = await seen;
    clearTimeout(timer);
    waiters.delete(key);
    if (i >= warmup) {
      if (tGone === null) timeouts++;
      else {
        lat.push(Number(tGone - tCommit));
        e2e.push(Number(tGone - tSend));
      }
    }
    await sleep(Math.random() * maxGapMs);
  }

  for (const n of nodes) await n.config('SET', 'notify-keyspace-events', previousFlags);
  for (const sub of subs) {
    await sub.punsubscribe();
    sub.disconnect();
  }
  for (const n of nodes) n.disconnect();
  await pg.end();

  if (process.env.RAW_FILE) {
    fs.writeFileSync(process.env.RAW_FILE, lat.map((v) => (v / 1000).toFixed(1)).join('\n') + '\n');
  }

  const ms = (ns) => (ns / 1e6).toFixed(3);
  const sorted = [...lat].sort((a, b) => a - b);
  const sortedE2e = [...e2e].sort((a, b) => a - b);
  const out = {
    samples: lat.length,
    timeouts,
    early: lat.filter((v) => v < 0).length,
  };
  if (sorted.length > 0) {
    Object.assign(out, {
      min_ms: ms(sorted[0]),
      p50_ms: ms(percentile(sorted, 0.50)),
      p90_ms: ms(percentile(sorted, 0.90)),
      p99_ms: ms(percentile(sorted, 0.99)),
      max_ms: ms(sorted[sorted.length - 1]),
      mean_ms: ms(sorted.reduce((a, b) => a + b, 0) / sorted.length),
      e2e_p50_ms: ms(percentile(sortedE2e, 0.50)),
      e2e_p99_ms: ms(percentile(sortedE2e, 0.99)),
    });
  }
  for (const [k, v] of Object.entries(out)) console.log(`${k}=${v}`);
}

main().catch((err) => {
  console.error('latency:', err.message);
  process.exit(1);
});
