"""bench/apply_cost.py -- Redis's CPU per write-through key, three ways side
by side (run by bench/apply_cost.sh, which starts the Redis it talks to).

  single  cachekit's apply script as it is now, one key per call (a
          cluster's way; one node sent one key per call before issue 15)
  batch   the same script, KEYS_PER_CALL keys per call (one node today)
  plain   SET key value EX ttl and SADD set key, pipelined, no script
          (no conditional write: the floor a script is measured against)

Each key is a random user:<n> of 100,000 joining tag:team:<n % 100>, with
a 120-byte JSON value and ttl 300, as bench/run.sh's write-through
scenario. Rounds are interleaved; the CPU is Redis's own (INFO cpu) per
key; ratios are taken within each round and reported as the median of
the per-round ratios with min-max.
"""
import random
import statistics
import sys

import redis

PORT = int(sys.argv[1])
SCRIPT = open(sys.argv[2]).read()
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
KEYS = int(sys.argv[4]) if len(sys.argv) > 4 else 100000
KEYS_PER_CALL = 85
ROWS = 100000
VALUE = ('{"id": 1, "email": "user1@example.com", "team_id": 1, '
         '"name": "User 1", "updated_at": "2026-12-02T10:00:00+00:00"}')

r = redis.Redis(port=PORT)
sha = r.script_load(SCRIPT)


def cpu():
    c = r.info('cpu')
    return c['used_cpu_user'] + c['used_cpu_sys']


def populate():
    r.flushall()
    p = r.pipeline(transaction=False)
    for i in range(ROWS):
        p.set(f"user:{i}", VALUE, ex=300)
        p.sadd(f"tag:team:{i % 100}", f"user:{i}")
        if i % 10000 == 9999:
            p.execute()
    p.execute()


def script_calls(per_call):
    for _ in range(KEYS // per_call):
        keys, args = [], []
        for _ in range(per_call):
            i = random.randrange(ROWS)
            keys += [f"user:{i}", f"tag:team:{i % 100}"]
            args += ['set', VALUE, '300', '1', '0']
        p = r.pipeline(transaction=False)
        p.evalsha(sha, len(keys), *keys, *args)
        p.execute()


def single():
    # one key per call, a batch's calls pipelined as the worker sends them
    for _ in range(KEYS // KEYS_PER_CALL):
        p = r.pipeline(transaction=False)
        for _ in range(KEYS_PER_CALL):
            i = random.randrange(ROWS)
            p.evalsha(sha, 2, f"user:{i}", f"tag:team:{i % 100}", 'set', VALUE, '300', '1', '0')
        p.execute()


def batch():
    script_calls(KEYS_PER_CALL)


def plain():
    for _ in range(KEYS // KEYS_PER_CALL):
        p = r.pipeline(transaction=False)
        for _ in range(KEYS_PER_CALL):
            i = random.randrange(ROWS)
            p.set(f"user:{i}", VALUE, ex=300)
            p.sadd(f"tag:team:{i % 100}", f"user:{i}")
        p.execute()


WAYS = [('single', single), ('batch', batch), ('plain', plain)]
populate()
per_round = []
for rnd in range(ROUNDS):
    us = {}
    for name, fn in WAYS:
        c0 = cpu()
        fn()
        us[name] = (cpu() - c0) / KEYS * 1e6
    per_round.append(us)
    print(f"round {rnd + 1}: " + ", ".join(f"{n} {us[n]:.2f}" for n, _ in WAYS)
          + " us of Redis CPU per key", flush=True)


def summary(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


for name, _ in WAYS:
    print(f"{name:7s} us per key: {summary([u[name] for u in per_round])}")
for a, b in [('single', 'batch'), ('batch', 'plain'), ('single', 'plain')]:
    print(f"{a} / {b}, per round: {summary([u[a] / u[b] for u in per_round])}")
