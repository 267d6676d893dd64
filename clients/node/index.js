// clients/node/index.js -- cache-aside reads with leases, for caches that
// the cachekit PostgreSQL extension keeps in step with the database.
//
//   const { fetch, decode } = require('cachekit-lease');
//   const user = await fetch(redis, `user:${id}`, () => loadUser(id),
//                            { ttl: 300, tags: [`team:${teamId}`] });
//
// On a miss, fetch takes a lease: a token stored in the key itself. It then
// calls the loader and fills the key with one script that writes the value
// only if the key still holds that token. cachekit's UNLINK of the key (or a
// tag flush that deletes it, or a write-through SET) between the lease and
// the fill removes the token, so a value read before that commit is never
// written back. A reader that finds another reader's lease waits up to
// waitMs for the value, then calls the loader itself without filling.
//
// A key holds either a lease (a string starting with a NUL byte) or a value
// encoded as JSON text, which never starts with one; cachekit's write-through
// values are JSON objects, so decode() reads them too.
//
// Redis Cluster: every script touches one key only. The key's tag sets are
// updated by separate commands (in their own slots): SADD right after the
// lease is taken, and SADD + EXPIRE after a successful fill. See README.md.

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const LEASE_PREFIX = '\u0000cachekit-lease:';

// the scripts, shared with clients/python (see the comments in each file)
const script = (name) => fs.readFileSync(path.join(__dirname, '..', 'lua', `${name}.lua`), 'utf8');
const LEASE_SCRIPT = script('lease');
const FILL_SCRIPT = script('fill');
const TAG_SCRIPT = script('tag');
const RELEASE_SCRIPT = script('release');

const SHA = new Map();

// EVALSHA, loading the script on NOSCRIPT (a restarted or failed-over Redis).
async function runScript(redis, body, keys, args) {
  let sha = SHA.get(body);
  if (!sha) {
    sha = crypto.createHash('sha1').update(body).digest('hex');
    SHA.set(body, sha);
  }
  try {
    return await redis.evalsha(sha, keys.length, ...keys, ...args);
  } catch (err) {
    if (!String(err && err.message).startsWith('NOSCRIPT')) throw err;
    return redis.eval(body, keys.length, ...keys, ...args);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isLease(raw) {
  return raw.length > 0 && raw.charCodeAt(0) === 0;
}

// The value a raw Redis string holds, or undefined for a lease or an absent
// key. Throws SyntaxError for a string that is neither (not written by
// fetch nor by cachekit's write-through).
function decode(raw) {
  if (raw === null || raw === undefined) return undefined;
  const text = Buffer.isBuffer(raw) ? raw.toString('utf8') : String(raw);
  if (isLease(text)) return undefined;
  return JSON.parse(text);
}

function checkOptions(key, loader, opts) {
  if (typeof key !== 'string' || key === '') throw new TypeError('fetch: key must be a non-empty string');
  if (typeof loader !== 'function') throw new TypeError('fetch: loader must be a function');
  if (!Number.isInteger(opts.ttl) || opts.ttl <= 0) throw new TypeError('fetch: ttl must be a positive whole number of seconds');
  if (!Array.isArray(opts.tags)) throw new TypeError('fetch: tags must be an array');
  for (const n of ['leaseMs', 'waitMs', 'pollMs']) {
    if (!Number.isInteger(opts[n]) || opts[n] <= 0) throw new TypeError(`fetch: ${n} must be a positive whole number`);
  }
}

// Call the loader under our lease and fill the key if the lease survived.
async function loadAndFill(redis, key, loader, token, sets, o) {
  let value;
  try {
    value = await loader();
  } catch (err) {
    await runScript(redis, RELEASE_SCRIPT, [key], [token]).catch(() => {});
    throw err;
  }
  const json = JSON.stringify(value);
  if (json === undefined) {
    await runScript(redis, RELEASE_SCRIPT, [key], [token]).catch(() => {});
    throw new TypeError('fetch: the loader returned a value JSON cannot hold');
  }
  if (redis.isCluster) {
    const filled = await runScript(redis, FILL_SCRIPT, [key], [token, json, o.ttl]);
    if (filled === 1) {
      for (const s of sets) await runScript(redis, TAG_SCRIPT, [s], [key, o.ttl]);
    }
  } else {
    await runScript(redis, FILL_SCRIPT, [key, ...sets], [token, json, o.ttl]);
  }
  return value;
}

// Take the lease; returns the token if we hold it, else the key's string.
async function takeLease(redis, key, token, sets, o) {
  if (!redis.isCluster) return runScript(redis, LEASE_SCRIPT, [key, ...sets], [token, o.leaseMs]);
  const got = await runScript(redis, LEASE_SCRIPT, [key], [token, o.leaseMs]);
  // listed after the lease is taken: a flush before this read the row after
  // its commit; a flush after it deletes the lease
  if (got === token) for (const s of sets) await runScript(redis, TAG_SCRIPT, [s], [key, 0]);
  return got;
}

// The value of key: from Redis, or from loader() (filling the key under a lease).
async function fetch(redis, key, loader, options = {}) {
  const o = { tags: [], leaseMs: 10000, waitMs: 200, pollMs: 10, tagPrefix: 'tag:', ...options };
  checkOptions(key, loader, o);
  const sets = o.tags.map((t) => o.tagPrefix + t);
  let raw = await redis.get(key);
  let deadline = null;
  for (;;) {
    if (raw !== null && !isLease(raw)) return decode(raw);
    if (raw === null) {
      const token = LEASE_PREFIX + crypto.randomBytes(16).toString('hex');
      raw = await takeLease(redis, key, token, sets, o);
      if (raw === token) return loadAndFill(redis, key, loader, token, sets, o);
      continue;
    }
    // another reader holds the lease: wait for its value, then load unfilled
    if (deadline === null) deadline = Date.now() + o.waitMs;
    if (Date.now() >= deadline) return loader();
    await sleep(o.pollMs);
    raw = await redis.get(key);
  }
}

module.exports = { fetch, decode, LEASE_PREFIX };
