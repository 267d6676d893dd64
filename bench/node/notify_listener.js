'use strict';
// bench/node/notify_listener.js -- the "pg_notify + listener" alternative.
//
// LISTENs on a channel that a PL/pgSQL trigger notifies with
// "<key> <tag>" for every changed row, and deletes the key and the tag's set
// in Redis (DEL, auto-pipelined). Every 20 ms it writes how many
// notifications it has handled to COUNT_FILE, so that run.sh can see when
// it has caught up. Stops on SIGTERM/SIGINT.
//
// Environment: PGHOST PGPORT PGUSER PGDATABASE (read by pg), REDIS_PORT,
// CHANNEL (default bench_cache), TAG_PREFIX (default tag:), COUNT_FILE.

const fs = require('fs');
const { Client } = require('pg');
const Redis = require('ioredis');

const channel = process.env.CHANNEL || 'bench_cache';
const tagPrefix = process.env.TAG_PREFIX || 'tag:';
const countFile = process.env.COUNT_FILE;
if (!countFile || !process.env.REDIS_PORT) {
  console.error('notify_listener: COUNT_FILE and REDIS_PORT must be set');
  process.exit(2);
}

let handled = 0;
let failed = 0;
let stopping = false;

function writeCount() {
  // write then rename, so the reader never sees a half-written number
  fs.writeFileSync(countFile + '.tmp', `${handled} ${failed}\n`);
  fs.renameSync(countFile + '.tmp', countFile);
}

async function main() {
  const redis = new Redis({
    host: '127.0.0.1',
    port: Number(process.env.REDIS_PORT),
    enableAutoPipelining: true,
    maxRetriesPerRequest: 3,
  });
  await redis.ping();

  const pg = new Client();
  await pg.connect();
  pg.on('notification', (msg) => {
    const sp = msg.payload.indexOf(' ');
    const key = sp < 0 ? msg.payload : msg.payload.slice(0, sp);
    const tag = sp < 0 ? null : msg.payload.slice(sp + 1);
    const p = tag ? redis.del(key, tagPrefix + tag) : redis.del(key);
    p.then(() => { handled++; }, (err) => {
      failed++;
      if (failed <= 5) console.error('notify_listener: DEL failed:', err.message);
    });
  });
  pg.on('error', (err) => {
    if (!stopping) {
      console.error('notify_listener: connection lost:', err.message);
      process.exit(1);
    }
  });
  await pg.query(`LISTEN ${channel}`);

  writeCount();
  const timer = setInterval(writeCount, 20);

  const stop = async () => {
    if (stopping) return;
    stopping = true;
    clearInterval(timer);
    writeCount();
    try { await pg.end(); } catch (e) { /* going anyway */ }
    redis.disconnect();
    writeCount();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error('notify_listener:', err.message);
  process.exit(1);
});
