"""Cache-aside reads with leases, for caches kept by the cachekit PostgreSQL
extension (redis-py).

    from cachekit_lease import fetch, decode
    user = fetch(r, f"user:{uid}", lambda: load_user(uid), ttl=300,
                 tags=(f"team:{team}",))

On a miss, fetch takes a lease: a token stored in the key itself. It then
calls the loader and fills the key with one script that writes the value only
if the key still holds that token. cachekit's UNLINK of the key (or a tag
flush that deletes it, or a write-through SET) between the lease and the fill
removes the token, so a value read before that commit is never written back.
A reader that finds another reader's lease waits up to wait_ms for the value,
then calls the loader itself without filling.

A key holds either a lease (a string starting with a NUL byte) or a value
encoded as JSON text, which never starts with one; cachekit's write-through
values are JSON objects, so decode() reads them too.

Redis Cluster (redis.cluster.RedisCluster): every script touches one key
only; the key's tag sets are updated by separate commands in their own slots,
SADD right after the lease is taken and SADD + EXPIRE after a successful
fill. See README.md.
"""

import hashlib
import json
import os
import time

__all__ = ["fetch", "decode", "LEASE_PREFIX"]

LEASE_PREFIX = "\x00cachekit-lease:"


def _script(name):
    """A script shared with clients/node (see the comments in each file)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lua", name + ".lua")
    with open(path, encoding="utf-8") as f:
        return f.read()


_LEASE, _FILL, _TAG, _RELEASE = (_script(n) for n in ("lease", "fill", "tag", "release"))
_SHA = {body: hashlib.sha1(body.encode()).hexdigest() for body in (_LEASE, _FILL, _TAG, _RELEASE)}


def _run(r, body, keys, args):
    """EVALSHA, loading the script on NOSCRIPT (a restarted or failed-over Redis)."""
    from redis.exceptions import NoScriptError
    try:
        return r.evalsha(_SHA[body], len(keys), *keys, *args)
    except NoScriptError:
        return r.eval(body, len(keys), *keys, *args)


def _text(raw):
    return raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw


def _is_lease(text):
    return text[:1] == "\x00"


def _is_cluster(r):
    try:
        from redis.cluster import RedisCluster
    except ImportError:
        return False
    return isinstance(r, RedisCluster)


def decode(raw):
    """The value a raw Redis string holds, or None for a lease or an absent key.

    Raises ValueError for a string that is neither (not written by fetch nor
    by cachekit's write-through)."""
    if raw is None:
        return None
    text = _text(raw)
    if _is_lease(text):
        return None
    return json.loads(text)


def _check(key, loader, ttl, tags, lease_ms, wait_ms, poll_ms):
    if not isinstance(key, str) or not key:
        raise TypeError("fetch: key must be a non-empty string")
    if not callable(loader):
        raise TypeError("fetch: loader must be callable")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise TypeError("fetch: ttl must be a positive whole number of seconds")
    if isinstance(tags, str):
        raise TypeError("fetch: tags must be a sequence of strings, not a string")
    for name, v in (("lease_ms", lease_ms), ("wait_ms", wait_ms), ("poll_ms", poll_ms)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise TypeError(f"fetch: {name} must be a positive whole number")


def _take_lease(r, key, token, sets, lease_ms):
    """Take the lease: returns the token if we hold it, else the key's string."""
    if not _is_cluster(r):
        return _text(_run(r, _LEASE, [key, *sets], [token, lease_ms]))
    got = _text(_run(r, _LEASE, [key], [token, lease_ms]))
    # listed after the lease is taken: a flush before this read the row after
    # its commit; a flush after it deletes the lease
    if got == token:
        for s in sets:
            _run(r, _TAG, [s], [key, 0])
    return got


def _load_and_fill(r, key, loader, token, sets, ttl):
    """Call the loader under our lease and fill the key if the lease survived."""
    try:
        value = loader()
        data = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except BaseException:
        try:
            _run(r, _RELEASE, [key], [token])
        except Exception:
            pass
        raise
    if _is_cluster(r):
        if _run(r, _FILL, [key], [token, data, ttl]) == 1:
            for s in sets:
                _run(r, _TAG, [s], [key, ttl])
    else:
        _run(r, _FILL, [key, *sets], [token, data, ttl])
    return value


def fetch(r, key, loader, ttl, tags=(), lease_ms=10000, wait_ms=200, poll_ms=10,
          tag_prefix="tag:"):
    """The value of key: from Redis, or from loader() (filling the key under a lease)."""
    _check(key, loader, ttl, tags, lease_ms, wait_ms, poll_ms)
    sets = [tag_prefix + t for t in tags]
    raw = _text(r.get(key))
    deadline = None
    while True:
        if raw is not None and not _is_lease(raw):
            return decode(raw)
        if raw is None:
            token = LEASE_PREFIX + os.urandom(16).hex()
            raw = _take_lease(r, key, token, sets, lease_ms)
            if raw == token:
                return _load_and_fill(r, key, loader, token, sets, ttl)
            continue
        # another reader holds the lease: wait for its value, then load unfilled
        if deadline is None:
            deadline = time.monotonic() + wait_ms / 1000.0
        if time.monotonic() >= deadline:
            return loader()
        time.sleep(poll_ms / 1000.0)
        raw = _text(r.get(key))
