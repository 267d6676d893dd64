#!/usr/bin/env bash
# bench/consistency/run.sh -- the stale-cache checker: one command, as root.
#
#   bash bench/consistency/run.sh                    full matrix (about 35 minutes)
#   RUNS=1 SECONDS_PER_RUN=3 bash bench/consistency/run.sh   smoke run
#
# Builds and installs cachekit (test/setup.sh), installs pg + ioredis from
# npm (bench/consistency/package-lock.json), starts its own PostgreSQL 15
# with cachekit and its own redis-server in a temporary folder, runs
# check.js (see there and bench/README.md) and prints its table, which is
# also written to bench/consistency/last-run.txt. Servers are stopped on
# exit, also after an error or Ctrl-C.
#
# Environment (defaults in brackets):
#   MODES            invalidation write_through
#   KINDS            plain redelete lease
#   DELAYS           fill delays in ms [0 2 20 200]
#   RUNS             runs per combination [5]
#   SECONDS_PER_RUN  seconds of load per run [15]
#   WRITERS, READERS, ROWS   [4, 8, 2000]
#   REDELETE_AFTER   cachekit.redelete_after of the redelete kind [500ms]
#   PROBE_EVERY      probe one write in this many [10]
#   CACHEKIT_PG_BIN  PostgreSQL 15 bin folder [/usr/lib/postgresql/15/bin]
#   CHECK_BUILD_DIR  build folder for test/setup.sh [/tmp/cachekit-consistency-build]
#   CHECK_SKIP_BUILD=1   use the installed cachekit
#   CHECK_KEEP=1     keep the temporary folder (logs, results.jsonl)

{
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/../.." && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

say() { printf '%s ==> %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/consistency/run.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must be run as root (it builds, installs and starts servers as postgres)"
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed (Node.js 20)"

WORK= PG_DATA= REDIS_PID=
cleanup() {
    local rc=$? pid n
    trap - EXIT INT TERM
    set +e
    if [[ -n $PG_DATA && -f $PG_DATA/postmaster.pid ]]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null 2>&1
    fi
    if [[ -n $REDIS_PID ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill -TERM "$REDIS_PID"
        for ((n = 0; n < 100; n++)); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if ((rc != 0)) && [[ -f $WORK/postgres.log ]]; then tail -n 30 "$WORK/postgres.log" >&2; fi
        if [[ ${CHECK_KEEP:-0} == 1 ]]; then say "kept $WORK"; else rm -rf -- "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_in_use "$p"; do p=$((p + 1)); ((p < $1 + 200)) || die "no free port near $1"; done
    echo "$p"
}

if [[ ${CHECK_SKIP_BUILD:-0} != 1 ]]; then
    say "building and installing cachekit (test/setup.sh)"
    CACHEKIT_PG_BIN=$PG_BIN CACHEKIT_BUILD_DIR=${CHECK_BUILD_DIR:-/tmp/cachekit-consistency-build} \
        bash "$REPO_DIR/test/setup.sh" >/dev/null
fi
[[ -f $("$PG_BIN/pg_config" --pkglibdir)/cachekit.so ]] || die "cachekit is not installed in $PG_BIN"
say "npm ci in bench/consistency (pg, ioredis)"
(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci failed"

WORK=$(mktemp -d /tmp/cachekit-consistency.XXXXXX)
chown postgres:postgres "$WORK"
PG_DATA=$WORK/pgdata
PG_PORT=$(free_port 56532)
REDIS_PORT=$(free_port 64890)

say "starting redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no --save '' --appendonly no \
    --daemonize no --dir "$WORK" --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
for ((n = 0; ; n++)); do
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited (port $REDIS_PORT taken?)"
    redis-cli -p "$REDIS_PORT" --raw INFO server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$REDIS_PID" && break
    ((n < 200)) || die "redis-server did not answer within 10 seconds"
    sleep 0.05
done

say "starting PostgreSQL on port $PG_PORT"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust --no-locale -E UTF8 \
    >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$PG_DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'cachekit'
synchronous_commit = off
max_connections = 100
cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'
cachekit.database = 'postgres'
EOF
# another engineer's server may take the port between the check and the bind
for ((try = 1; ; try++)); do
    if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -o "-p $PG_PORT" \
        -w -t 120 start >/dev/null; then
        break
    fi
    ((try < 5)) || die "PostgreSQL did not start"
    PG_PORT=$(free_port $((PG_PORT + 1)))
    say "retrying on port $PG_PORT"
done
export PGHOST=$WORK PGPORT=$PG_PORT PGUSER=postgres PGDATABASE=postgres REDIS_PORT
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION cachekit' >/dev/null

export SECONDS_PER_RUN=${SECONDS_PER_RUN:-15}
say "checking (results also in bench/consistency/last-run.txt)"
{
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores, load avg $(cut -d' ' -f1-3 /proc/loadavg) at start;" \
        "cachekit $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')"
    SECONDS=$SECONDS_PER_RUN RESULTS_FILE=$WORK/results.jsonl node "$HERE/check.js"
} | tee "$HERE/last-run.txt"
}
