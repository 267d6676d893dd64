"""Tests of cachekit_lease.fetch/decode against a real redis-server that a
real PostgreSQL with cachekit delivers to, through a Sentinel, and against a
real 3-primary Redis Cluster.

test/t/165_clients.pl starts the servers and runs this file with
CK_REDIS_PORT, CK_SENTINEL_PORT, CK_SENTINEL_NAME, CK_CLUSTER_PORTS,
CK_PGHOST and CK_PGPORT (see clients/node/test/fetch.test.js for the tables).
"""

import os
import subprocess
import threading
import time

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from cachekit_lease import LEASE_PREFIX, decode, fetch

ENV = os.environ
pytestmark = pytest.mark.skipif("CK_REDIS_PORT" not in ENV,
                                reason="servers not given (run by test/t/165_clients.pl)")


def sql(q):
    out = subprocess.run(["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                          "-h", ENV["CK_PGHOST"], "-p", ENV["CK_PGPORT"], "-d", "postgres",
                          "-c", q], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def write(q):
    """Commit a statement and wait until cachekit delivered it."""
    sql(q)
    assert sql("SELECT cachekit_wait('30 seconds')") == "t"


def row_v(table, rid):
    return int(sql(f"SELECT v FROM {table} WHERE id = {rid}"))


_seq = [0]


def fresh_row(r, grp=1):
    """A fresh row of items in group grp, its key absent from Redis."""
    _seq[0] += 1
    rid = 500000 + os.getpid() % 1000 * 100 + _seq[0]
    write(f"INSERT INTO items VALUES ({rid}, 0, {grp}) "
          f"ON CONFLICT (id) DO UPDATE SET v = 0, grp = {grp}")
    assert r.exists(f"item:{rid}") == 0
    return rid


def single():
    return redis.Redis(host="127.0.0.1", port=int(ENV["CK_REDIS_PORT"]))


def sentinel():
    s = Sentinel([("127.0.0.1", int(ENV["CK_SENTINEL_PORT"]))])
    return s.master_for(ENV["CK_SENTINEL_NAME"])


def cluster():
    nodes = [ClusterNode("127.0.0.1", int(p)) for p in ENV["CK_CLUSTER_PORTS"].split(",")]
    return RedisCluster(startup_nodes=nodes)


@pytest.fixture(params=["single", "sentinel"])
def ck(request):
    """A client of the Redis that cachekit delivers to."""
    r = {"single": single, "sentinel": sentinel}[request.param]()
    yield r
    r.close()


@pytest.fixture(params=["single", "sentinel", "cluster"])
def any_redis(request):
    r = {"single": single, "sentinel": sentinel, "cluster": cluster}[request.param]()
    yield request.param, r
    r.close()


# ---- against cachekit -----------------------------------------------------------

def test_miss_loads_once_fills_with_ttl_and_tags(ck):
    rid = fresh_row(ck)
    calls = []

    def loader():
        calls.append(1)
        return {"id": rid, "v": row_v("items", rid)}

    assert fetch(ck, f"item:{rid}", loader, ttl=60, tags=("grp:1",)) == {"id": rid, "v": 0}
    assert fetch(ck, f"item:{rid}", loader, ttl=60, tags=("grp:1",)) == {"id": rid, "v": 0}
    assert len(calls) == 1
    assert decode(ck.get(f"item:{rid}")) == {"id": rid, "v": 0}
    assert 0 < ck.ttl(f"item:{rid}") <= 60
    assert ck.sismember("tag:grp:1", f"item:{rid}")


def test_update_between_lease_and_fill_revokes_the_lease(ck):
    rid = fresh_row(ck)

    def loader():
        old = row_v("items", rid)  # the reader reads the old row
        write(f"UPDATE items SET v = v + 1 WHERE id = {rid}")  # cachekit UNLINKs the key
        return {"id": rid, "v": old}

    assert fetch(ck, f"item:{rid}", loader, ttl=60) == {"id": rid, "v": 0}
    assert ck.get(f"item:{rid}") is None, "the stale value was not written back"
    assert fetch(ck, f"item:{rid}", lambda: {"id": rid, "v": row_v("items", rid)},
                 ttl=60) == {"id": rid, "v": 1}


def test_tag_flush_between_lease_and_fill_revokes_the_lease(ck):
    rid = fresh_row(ck, 2)
    key = f"list:grp:2:{rid}"

    def loader():
        old = row_v("items", rid)
        write(f"UPDATE items SET v = v + 1 WHERE id = {rid}")  # flushes tag grp:2
        return [old]

    fetch(ck, key, loader, ttl=60, tags=("grp:2",))
    assert ck.get(key) is None


def test_write_through_between_lease_and_fill_wins(ck):
    write("INSERT INTO wt VALUES (2, 0) ON CONFLICT (id) DO UPDATE SET v = 0")
    ck.delete("wt:2")

    def loader():
        old = row_v("wt", 2)
        write("UPDATE wt SET v = v + 1 WHERE id = 2")  # cachekit SETs wt:2
        return {"id": 2, "v": old}

    assert fetch(ck, "wt:2", loader, ttl=60) == {"id": 2, "v": 0}
    assert decode(ck.get("wt:2")) == {"id": 2, "v": 1}


# ---- lease mechanics, every topology ----------------------------------------------

def k(name, s):
    return f"{{py-lease}}:{name}:{s}"


def test_waiter_gets_the_holders_value(any_redis):
    name, r = any_redis
    calls = []
    result = {}

    def slow():
        time.sleep(0.15)
        calls.append("first")
        return "first"

    t = threading.Thread(target=lambda: result.setdefault("a", fetch(r, k(name, "wait"), slow,
                                                                      ttl=60, wait_ms=5000)))
    t.start()
    deadline = time.monotonic() + 30
    while r.get(k(name, "wait")) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    b = fetch(r, k(name, "wait"), lambda: calls.append("second") or "second", ttl=60, wait_ms=5000)
    t.join()
    assert result["a"] == "first" and b == "first"
    assert calls == ["first"], "the waiting reader did not load"


def test_after_the_bound_load_without_filling(any_redis):
    name, r = any_redis
    foreign = LEASE_PREFIX + "someone-else"
    r.set(k(name, "bound"), foreign, px=60000)
    t0 = time.monotonic()
    assert fetch(r, k(name, "bound"), lambda: "mine", ttl=60, wait_ms=100) == "mine"
    assert time.monotonic() - t0 >= 0.1
    assert r.get(k(name, "bound")) == foreign.encode()
    assert decode(foreign) is None


def test_values_that_look_like_leases_are_values(any_redis):
    name, r = any_redis
    tricky = LEASE_PREFIX + "not-a-lease"
    assert fetch(r, k(name, "tricky"), lambda: tricky, ttl=60) == tricky
    assert decode(r.get(k(name, "tricky"))) == tricky
    assert fetch(r, k(name, "tricky"), lambda: pytest.fail("loaded on a hit"), ttl=60) == tricky


def test_failing_loader_gives_the_lease_back(any_redis):
    name, r = any_redis

    def boom():
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError, match="db down"):
        fetch(r, k(name, "fail"), boom, ttl=60)
    assert r.exists(k(name, "fail")) == 0
    with pytest.raises(TypeError):
        fetch(r, k(name, "fail"), lambda: object(), ttl=60)
    assert r.exists(k(name, "fail")) == 0


def test_decode():
    assert decode(None) is None
    assert decode(LEASE_PREFIX + "abc") is None
    assert decode(b'{"id": 1, "v": 2}') == {"id": 1, "v": 2}
    assert decode('[1,"a"]') == [1, "a"]
    assert decode('"\\u0000x"') == "\x00x"
    with pytest.raises(ValueError):
        decode("plain text")


def test_bad_arguments(any_redis):
    name, r = any_redis
    with pytest.raises(TypeError, match="ttl"):
        fetch(r, k(name, "x"), lambda: 1, ttl=0)
    with pytest.raises(TypeError, match="tags"):
        fetch(r, k(name, "x"), lambda: 1, ttl=5, tags="a")
    with pytest.raises(TypeError, match="key"):
        fetch(r, "", lambda: 1, ttl=5)


# ---- cluster: cachekit does not speak Cluster yet, the test deletes as it would ----

def test_cluster_tag_sets_in_other_slots_and_revocation():
    r = cluster()
    tags = ("p-a", "p-b", "p-c", "p-d")
    fetch(r, "pkey:1", lambda: 1, ttl=60, tags=tags)
    for t in tags:
        assert r.sismember(f"tag:{t}", "pkey:1"), t
    assert r.ttl("tag:p-a") >= 100

    def deleted_meanwhile():
        r.unlink("pkey:2")
        return "old"

    fetch(r, "pkey:2", deleted_meanwhile, ttl=60, tags=tags)
    assert r.get("pkey:2") is None

    def flushed_meanwhile():
        for m in r.smembers("tag:p-flush"):
            r.unlink(m)
        r.unlink("tag:p-flush")
        return "old"

    fetch(r, "pkey:3", flushed_meanwhile, ttl=60, tags=("p-flush",))
    assert r.get("pkey:3") is None
    r.close()
