#!/usr/bin/env bash
# bench/apply_cost.sh -- Redis's CPU per write-through key: cachekit's apply
# script one key per call, many keys per call, and plain SET + SADD without
# a script, side by side in interleaved rounds (bench/apply_cost.py).
#
#   bash bench/apply_cost.sh [rounds [keys per way and round]]   # 5, 100000
#
# Starts its own redis-server on a free loopback port, takes the apply
# script out of src/deliver.c as the worker loads it, and stops the server
# on exit. Needs redis-server and python3-redis (test/setup.sh installs
# both).

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

ROUNDS=${1:-5}
KEYS=${2:-100000}
PY=/usr/bin/python3
"$PY" -c 'import redis' 2>/dev/null || die "python3-redis is not installed (test/setup.sh installs it)"
command -v redis-server >/dev/null || die "redis-server is not installed"

WORK=$(mktemp -d /tmp/cachekit-apply-bench.XXXXXX)
PORT=$(free_port 63890)
REDIS_PID=
cleanup() {
    [[ -z $REDIS_PID ]] || kill "$REDIS_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# the script as the C string in src/deliver.c holds it
"$PY" - "$REPO_DIR/src/deliver.c" "$WORK/apply.lua" <<'PYEOF'
import re, sys
src = open(sys.argv[1]).read()
start = src.index('static const char *apply_script =')
end = src.index('";\n', start) + 1
lines = re.findall(r'^"(.*)"$', src[start:end], re.M)
text = ''.join(l.replace('\\n', '\n').replace("\\'", "'").replace('\\"', '"') for l in lines)
open(sys.argv[2], 'w').write(text)
PYEOF

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
    >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 50); do
    [[ $(redis-cli -p "$PORT" PING 2>/dev/null) == PONG ]] && break
    sleep 0.1
done
[[ $(redis-cli -p "$PORT" PING 2>/dev/null) == PONG ]] || die "redis-server did not start on port $PORT"

say "Redis CPU per write-through key: $ROUNDS interleaved rounds of $KEYS keys per way (port $PORT)"
"$PY" "$BENCH_DIR/apply_cost.py" "$PORT" "$WORK/apply.lua" "$ROUNDS" "$KEYS"
