'use strict';
// bench/node/outbox_drainer.js -- the "PL/pgSQL outbox + drainer" alternative.
//
// A loop that takes up to BATCH rows from the outbox table, oldest first, in
// one transaction: DELETE ... RETURNING them, send DEL for their keys and
// their tags' sets to Redis (distinct names, 500 per DEL), and COMMIT once
// Redis answered (so a failure leaves the rows for the next try). When the
// outbox is empty it sleeps POLL_MS. Every 100 ms it writes the number of
// rows it has drained to COUNT_FILE. Stops on SIGTERM/SIGINT after the
// batch in hand.
//
// Environment: PGHOST PGPORT PGUSER PGDATABASE (read by pg), REDIS_PORT,
// TABLE (default bench_outbox), BATCH (default 1000), POLL_MS (default 10),
// TAG_PREFIX (default tag:), COUNT_FILE.

const fs = require('fs');
const { Client } = require('pg');
const Redis = require('ioredis');

const table = process.env.TABLE || 'bench_outbox';
const batch = Number(process.env.BATCH || 1000);
const pollMs = Number(process.env.POLL_MS || 10);
const tagPrefix = process.env.TAG_PREFIX || 'tag:';
const countFile = process.env.COUNT_FILE;
if (!countFile || !process.env.REDIS_PORT) {
  console.error('outbox_drainer: COUNT_FILE and REDIS_PORT must be set');
  process.exit(2);
}

let drained = 0;
let stopping = false;

function writeCount() {
  fs.writeFileSync(countFile + '.tmp', `${drained} 0\n`);
  fs.renameSync(countFile + '.tmp', countFile);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const redis = new Redis({ host: '127.0.0.1', port: Number(process.env.REDIS_PORT) });
  await redis.ping();
  const pg = new Client();
  await pg.connect();

  const take = {
    name: 'take',
    // ARRAY(...) takes the ids once; "id IN (SELECT ...)" can get a plan
    // that runs the subquery again for every row of a long outbox
    text: `DELETE FROM ${table} WHERE id = ANY (ARRAY(`
        + `SELECT id FROM ${table} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) `
        + 'RETURNING key, tag',
    values: [batch],
  };

  process.on('SIGTERM', () => { stopping = true; });
  process.on('SIGINT', () => { stopping = true; });
  writeCount();
  const timer = setInterval(writeCount, 100);

  while (!stopping) {
    await pg.query('BEGIN');
    const { rows } = await pg.query(take);
    if (rows.length > 0) {
      const names = new Set();
      for (const r of rows) {
        names.add(r.key);
        if (r.tag !== null) names.add(tagPrefix + r.tag);
      }
      const all = [...names];
      const pipeline = redis.pipeline();
      for (let i = 0; i < all.length; i += 500) pipeline.del(...all.slice(i, i + 500));
      const replies = await pipeline.exec();
      for (const [err] of replies) if (err) throw err;
    }
    await pg.query('COMMIT');
    drained += rows.length;
    if (rows.length === 0) await sleep(pollMs);
  }

  clearInterval(timer);
  writeCount();
  await pg.end();
  redis.disconnect();
}

main().catch((err) => {
  console.error('outbox_drainer:', err.message);
  process.exit(1);
});
