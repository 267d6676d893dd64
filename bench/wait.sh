#!/usr/bin/env bash
# bench/wait.sh -- does waiting in cachekit_wait slow delivery? As root.
#
#   bash bench/wait.sh
#
# Starts its own PostgreSQL with cachekit and a redis-server. In each of
# WAIT_ROUNDS rounds it builds a backlog of WAIT_ENTRIES one-key
# entries while the worker points at a dead port, then points it back and
# times the drain (from the reload to the worker's last delivery), once with
# nobody waiting and once with WAIT_SESSIONS sessions in
# cachekit_wait('2 min') started before the reload; the order alternates
# between rounds. It prints every round and the median of the per-round
# ratios (with waiters / alone) with their min-max. Output also goes to
# bench/wait-last-run.txt.
#
# Environment: WAIT_ENTRIES [300000], WAIT_SESSIONS [8], WAIT_ROUNDS [3],
# CACHEKIT_PG_BIN, BENCH_SKIP_BUILD=1 (use the installed cachekit).
{
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
ENTRIES=${WAIT_ENTRIES:-300000}
SESSIONS=${WAIT_SESSIONS:-8}
ROUNDS=${WAIT_ROUNDS:-3}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

say() { printf '%s ==> %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/wait.sh: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must be run as root"
free_port() {
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    say "building and installing cachekit (test/setup.sh)"
    CACHEKIT_BUILD_DIR=/tmp/cachekit-bench-build CACHEKIT_PG_BIN=$PG_BIN \
        bash "$REPO_DIR/test/setup.sh" >/dev/null
fi

WORK=$(mktemp -d /tmp/cachekit-wait-bench.XXXXXX)
chown postgres:postgres "$WORK"
REDIS_PID=
cleanup() {
    set +e
    [[ -z ${PG_DATA:-} || ! -f $PG_DATA/postmaster.pid ]] ||
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
    [[ -z $REDIS_PID ]] || { kill "$REDIS_PID"; wait "$REDIS_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

REDIS_PORT=$(free_port 63990)
PG_PORT=$(free_port 55632)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --dir "$WORK" --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
for ((n = 0; n < 200; n++)); do
    [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && break
    sleep 0.05
done
[[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] || die "redis-server did not start"

PG_DATA=$WORK/pgdata
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust --no-locale -E UTF8 \
    >"$WORK/initdb.log" 2>&1 || die "initdb failed"
cat >>"$PG_DATA/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
shared_preload_libraries = 'cachekit'
cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'
cachekit.retry_max_delay = '100ms'
synchronous_commit = off
max_connections = 100
EOF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w start >/dev/null \
    || die "PostgreSQL did not start"
q() { runuser -u postgres -- "$PG_BIN/psql" -X -qAt -h "$WORK" -p "$PG_PORT" -d postgres -c "$1"; }
q "CREATE EXTENSION cachekit" 2>/dev/null

# one drain of a fresh backlog with $1 waiting sessions; prints seconds
drain() {
    local waiters=$1 pids=() t0 end depth
    q "ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'"
    q "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
    q "INSERT INTO cachekit_queue (kind, keys) SELECT 'i', ARRAY['w:' || g] FROM generate_series(1, $ENTRIES) g" >/dev/null
    for ((i = 0; i < waiters; i++)); do
        q "SELECT cachekit_wait('2 min')" >/dev/null &
        pids+=($!)
    done
    while (($(q "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT cachekit_wait%' AND state = 'active'") < waiters)); do
        sleep 0.05
    done
    q "ALTER SYSTEM RESET cachekit.redis_url"
    t0=$(q "SELECT extract(epoch FROM clock_timestamp()) FROM pg_reload_conf()")
    while :; do
        depth=$(q "SELECT count(*) FROM cachekit_queue")
        ((depth == 0)) && break
        sleep 0.2
    done
    end=$(q "SELECT extract(epoch FROM last_delivery_at) FROM cachekit_worker_state()")
    for pid in "${pids[@]}"; do wait "$pid"; done
    awk -v a="$t0" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

say "$ROUNDS rounds: drain $ENTRIES entries alone and with $SESSIONS sessions in cachekit_wait"
ratios=()
{
    echo "cachekit_wait bench: $ENTRIES entries, $SESSIONS waiting sessions, $ROUNDS rounds ($(nproc) cores)"
    for ((r = 1; r <= ROUNDS; r++)); do
        if ((r % 2)); then alone=$(drain 0); waited=$(drain "$SESSIONS")
        else waited=$(drain "$SESSIONS"); alone=$(drain 0); fi
        ratio=$(awk -v a="$alone" -v w="$waited" 'BEGIN { printf "%.3f", w / a }')
        ratios+=("$ratio")
        echo "round $r: alone ${alone}s, with waiters ${waited}s, ratio $ratio"
    done
    sorted=($(printf '%s\n' "${ratios[@]}" | sort -g))
    echo "with/alone: median ${sorted[$((ROUNDS / 2))]} (min ${sorted[0]}, max ${sorted[$((ROUNDS - 1))]})"
} | tee "$BENCH_DIR/wait-last-run.txt"
}
