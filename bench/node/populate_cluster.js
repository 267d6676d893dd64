'use strict';
// bench/node/populate_cluster.js -- SET <prefix>0 .. <prefix>N-1 in a Redis
// Cluster, each key on the primary of its slot (what DEBUG POPULATE does on
// one node; on a cluster node it would put keys in slots it does not serve).
//
// Environment: REDIS_CLUSTER_PORTS (comma list of primaries), COUNT, PREFIX (k:).

const Redis = require('ioredis');

async function main() {
  const ports = (process.env.REDIS_CLUSTER_PORTS || '').split(',').filter(Boolean).map(Number);
  const count = Number(process.env.COUNT || 0);
  const prefix = process.env.PREFIX || 'k:';
  const cluster = new Redis.Cluster(ports.map((port) => ({ host: '127.0.0.1', port })),
    { enableAutoPipelining: true });
  const inFlight = 10000;
  for (let first = 0; first < count; first += inFlight) {
    const batch = [];
    for (let i = first; i < Math.min(first + inFlight, count); i++) batch.push(cluster.set(prefix + i, 'value'));
    await Promise.all(batch);
  }
  cluster.disconnect();
}

main().catch((err) => {
  console.error('populate_cluster:', err.message);
  process.exit(1);
});
