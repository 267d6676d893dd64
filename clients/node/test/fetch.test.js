// clients/node/test/fetch.test.js -- fetch() and decode() against a real
// redis-server that a real PostgreSQL with cachekit delivers to, through a
// Sentinel, and against a real 3-primary Redis Cluster.
//
// test/t/165_clients.pl starts the servers and runs this file with
//   CK_REDIS_PORT      the Redis cachekit delivers to
//   CK_SENTINEL_PORT   a Sentinel monitoring it as CK_SENTINEL_NAME
//   CK_CLUSTER_PORTS   comma-separated ports of the cluster's primaries
//   CK_PGHOST, CK_PGPORT  the PostgreSQL server (database postgres, tables
//                      made by the TAP file: items with an invalidation
//                      trigger item:{id} + tag grp:{grp}, wt with a
//                      write-through trigger wt:{id})

'use strict';

const test = require('node:test');
const assert = require('node:assert');
const { execFileSync } = require('node:child_process');
const Redis = require('ioredis');
const { fetch, decode, LEASE_PREFIX } = require('..');

const env = process.env;
const skip = env.CK_REDIS_PORT ? false : 'servers not given (run by test/t/165_clients.pl)';

function sql(q) {
  return execFileSync('psql', ['-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
    '-h', env.CK_PGHOST, '-p', env.CK_PGPORT, '-d', 'postgres', '-c', q], { encoding: 'utf8' }).trim();
}

// commit an UPDATE and wait until cachekit delivered it
function write(q) {
  sql(q);
  assert.strictEqual(sql("SELECT cachekit_wait('30 seconds')"), 't');
}

const rowV = (id) => Number(sql(`SELECT v FROM items WHERE id = ${id}`));

let seq = 0;
// a fresh row of items in group grp, its key absent from Redis
async function freshRow(redis, grp = 1) {
  const id = 1000 + process.pid % 1000 * 100 + ++seq;
  write(`INSERT INTO items VALUES (${id}, 0, ${grp}) ON CONFLICT (id) DO UPDATE SET v = 0, grp = ${grp}`);
  assert.strictEqual(await redis.exists(`item:${id}`), 0);
  return id;
}

// the same checks for every topology that cachekit itself reaches
function cachekitSuite(name, connect) {
  test.describe(name, { skip }, () => {
    let redis;
    test.before(() => { redis = connect(); });
    test.after(() => redis.quit());

    test.it('a miss loads once and fills with ttl and tags; a hit does not load', async () => {
      const id = await freshRow(redis);
      let calls = 0;
      const loader = () => { calls++; return { id, v: rowV(id) }; };
      assert.deepStrictEqual(await fetch(redis, `item:${id}`, loader, { ttl: 60, tags: ['grp:1'] }), { id, v: 0 });
      assert.deepStrictEqual(await fetch(redis, `item:${id}`, loader, { ttl: 60, tags: ['grp:1'] }), { id, v: 0 });
      assert.strictEqual(calls, 1);
      assert.deepStrictEqual(decode(await redis.get(`item:${id}`)), { id, v: 0 });
      const ttl = await redis.ttl(`item:${id}`);
      assert.ok(ttl > 0 && ttl <= 60, `ttl ${ttl}`);
      assert.strictEqual(await redis.sismember('tag:grp:1', `item:${id}`), 1);
    });

    test.it('an UPDATE committed between the lease and the fill revokes the lease', async () => {
      const id = await freshRow(redis);
      const got = await fetch(redis, `item:${id}`, () => {
        const old = rowV(id);                       // the reader reads the old row
        write(`UPDATE items SET v = v + 1 WHERE id = ${id}`);   // cachekit UNLINKs the key
        return { id, v: old };
      }, { ttl: 60 });
      assert.deepStrictEqual(got, { id, v: 0 });  // the caller still gets what it read
      assert.strictEqual(await redis.get(`item:${id}`), null, 'the stale value was not written back');
      assert.deepStrictEqual(await fetch(redis, `item:${id}`, () => ({ id, v: rowV(id) }), { ttl: 60 }), { id, v: 1 });
    });

    test.it('a tag flush between the lease and the fill revokes the lease', async () => {
      const id = await freshRow(redis, 2);
      const key = `list:grp:2:${id}`;
      await fetch(redis, key, () => {
        const old = rowV(id);
        write(`UPDATE items SET v = v + 1 WHERE id = ${id}`);   // flushes tag grp:2
        return [old];
      }, { ttl: 60, tags: ['grp:2'] });
      assert.strictEqual(await redis.get(key), null, 'the listing read before the flush was not written back');
    });

    test.it('a write-through SET between the lease and the fill wins', async () => {
      write('INSERT INTO wt VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET v = 0');
      await redis.del('wt:1');
      const got = await fetch(redis, 'wt:1', () => {
        const old = Number(sql('SELECT v FROM wt WHERE id = 1'));
        write('UPDATE wt SET v = v + 1 WHERE id = 1');           // cachekit SETs wt:1
        return { id: 1, v: old };
      }, { ttl: 60 });
      assert.deepStrictEqual(got, { id: 1, v: 0 });
      assert.deepStrictEqual(decode(await redis.get('wt:1')), { id: 1, v: 1 }, 'write-through value kept');
    });
  });
}

// lease mechanics, for every topology
function leaseSuite(name, connect) {
  test.describe(name, { skip }, () => {
    let redis;
    test.before(() => { redis = connect(); });
    test.after(() => redis.quit());
    const k = (s) => `{lease-test}:${name}:${s}`;

    test.it('a reader finding another lease waits for its value instead of loading', async () => {
      let calls = 0;
      const slow = () => new Promise((res) => setTimeout(() => { calls++; res('first'); }, 150));
      const a = fetch(redis, k('wait'), slow, { ttl: 60, waitMs: 5000 });
      while ((await redis.get(k('wait'))) === null) await new Promise((r) => setTimeout(r, 5));
      const b = await fetch(redis, k('wait'), () => { calls++; return 'second'; }, { ttl: 60, waitMs: 5000 });
      assert.strictEqual(await a, 'first');
      assert.strictEqual(b, 'first');
      assert.strictEqual(calls, 1, 'the waiting reader did not load');
    });

    test.it('after the wait bound a reader loads itself and does not fill', async () => {
      const foreign = LEASE_PREFIX + 'someone-else';
      await redis.set(k('bound'), foreign, 'PX', 60000);
      const t0 = Date.now();
      const got = await fetch(redis, k('bound'), () => 'mine', { ttl: 60, waitMs: 100 });
      assert.strictEqual(got, 'mine');
      assert.ok(Date.now() - t0 >= 100, 'it waited first');
      assert.strictEqual(await redis.get(k('bound')), foreign, 'the other lease is untouched');
      assert.strictEqual(decode(foreign), undefined);
    });

    test.it('values that look like lease tokens are values', async () => {
      const tricky = LEASE_PREFIX + 'not-a-lease';
      assert.strictEqual(await fetch(redis, k('tricky'), () => tricky, { ttl: 60 }), tricky);
      assert.strictEqual(decode(await redis.get(k('tricky'))), tricky);
      let calls = 0;
      assert.strictEqual(await fetch(redis, k('tricky'), () => { calls++; return 'x'; }, { ttl: 60 }), tricky);
      assert.strictEqual(calls, 0, 'a hit');
    });

    test.it('a failing loader gives its lease back and throws', async () => {
      await assert.rejects(fetch(redis, k('fail'), () => { throw new Error('db down'); }, { ttl: 60 }), /db down/);
      assert.strictEqual(await redis.exists(k('fail')), 0);
      await assert.rejects(fetch(redis, k('fail'), () => undefined, { ttl: 60 }), TypeError);
      assert.strictEqual(await redis.exists(k('fail')), 0);
    });

    test.it('decode reads absent keys, leases, fetch values and write-through JSON', () => {
      assert.strictEqual(decode(null), undefined);
      assert.strictEqual(decode(LEASE_PREFIX + 'abc'), undefined);
      assert.deepStrictEqual(decode('{"id": 1, "v": 2}'), { id: 1, v: 2 });
      assert.deepStrictEqual(decode(Buffer.from('[1,"a"]')), [1, 'a']);
      assert.strictEqual(decode('"\\u0000x"'), '\u0000x');
      assert.throws(() => decode('plain text'), SyntaxError);
    });

    test.it('bad arguments are refused', async () => {
      await assert.rejects(fetch(redis, k('x'), () => 1, {}), /ttl/);
      await assert.rejects(fetch(redis, k('x'), () => 1, { ttl: 5, tags: 'a' }), /tags/);
      await assert.rejects(fetch(redis, '', () => 1, { ttl: 5 }), /key/);
    });
  });
}

const single = () => new Redis({ host: '127.0.0.1', port: Number(env.CK_REDIS_PORT) });
const sentinel = () => new Redis({
  sentinels: [{ host: '127.0.0.1', port: Number(env.CK_SENTINEL_PORT) }], name: env.CK_SENTINEL_NAME,
});
const cluster = () => new Redis.Cluster((env.CK_CLUSTER_PORTS || '').split(',').map((p) => ({ host: '127.0.0.1', port: Number(p) })));

cachekitSuite('single node with cachekit', single);
cachekitSuite('sentinel with cachekit', sentinel);
leaseSuite('single', single);
leaseSuite('sentinel', sentinel);
leaseSuite('cluster', cluster);

// cachekit does not speak Cluster yet: here the test deletes as cachekit would
test.describe('cluster: deletes and tag flushes revoke leases', { skip }, () => {
  let redis;
  test.before(() => { redis = cluster(); });
  test.after(() => redis.quit());

  test.it('tag sets in other slots are kept, and a key delete revokes the lease', async () => {
    const tags = ['c-a', 'c-b', 'c-c', 'c-d'];
    await fetch(redis, 'ckey:1', () => 1, { ttl: 60, tags });
    for (const t of tags) assert.strictEqual(await redis.sismember(`tag:${t}`, 'ckey:1'), 1, t);
    assert.ok(await redis.ttl('tag:c-a') >= 100);
    await fetch(redis, 'ckey:2', async () => { await redis.unlink('ckey:2'); return 'old'; }, { ttl: 60, tags });
    assert.strictEqual(await redis.get('ckey:2'), null);
  });

  test.it('a tag flush after the lease deletes the lease', async () => {
    await fetch(redis, 'ckey:3', async () => {
      // cachekit's flush: the set's members are deleted
      for (const m of await redis.smembers('tag:c-flush')) await redis.unlink(m);
      await redis.unlink('tag:c-flush');
      return 'old';
    }, { ttl: 60, tags: ['c-flush'] });
    assert.strictEqual(await redis.get('ckey:3'), null);
  });
});
