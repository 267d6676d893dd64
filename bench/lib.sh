# bench/lib.sh -- pieces shared by the side-by-side benchmarks (bench/tls.sh,
# bench/cluster.sh), sourced after they set BENCH_DIR, REPO_DIR, PG_BIN and,
# if they run Node helpers, NODE_DIR: a work folder, messages, free ports,
# cachekit built and installed, the node helpers installed, the latency
# probe built, a PostgreSQL with cachekit and a users table, the worker
# pointed at a URL, the row trigger on or off, and the median with min-max of
# a result series.

say() { printf '%s ==> %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# a free loopback port from $1 on (and its cluster bus port, +10000, free too)
free_port() {
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null ||
        (exec 3<>"/dev/tcp/127.0.0.1/$((p + 10000))") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}
now_ms() { date +%s%3N; }
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }

# as root, a work folder $WORK (/tmp/cachekit-$1-bench.*) PostgreSQL may
# use, cachekit built and installed, the node helpers installed (NODE_DIR set)
bench_init() {
    [[ $(id -u) -eq 0 ]] || die "must be run as root"
    WORK=$(mktemp -d "/tmp/cachekit-$1-bench.XXXXXX")
    chown postgres:postgres "$WORK"
    chmod 0755 "$WORK"
    bench_build
}

# build and install cachekit (unless BENCH_SKIP_BUILD=1), npm install bench/node
# for a caller that set NODE_DIR
bench_build() {
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        say "building and installing cachekit (test/setup.sh)"
        CACHEKIT_BUILD_DIR=${BENCH_BUILD_DIR:-/tmp/cachekit-bench-build} CACHEKIT_PG_BIN=$PG_BIN \
            bash "$REPO_DIR/test/setup.sh" >/dev/null
    fi
    if [[ -n ${NODE_DIR:-} && ! -d $NODE_DIR/node_modules/ioredis ]]; then
        say "npm install in bench/node (pg, ioredis)"
        (cd "$NODE_DIR" && npm install --no-audit --no-fund --no-package-lock --loglevel=error >/dev/null) \
            || die "npm install failed"
    fi
}

# the COMMIT -> key gone probe (bench/latency.c, libpq and hiredis) as $WORK/latency
latency_probe_build() {
    local inc
    inc=$("$PG_BIN/pg_config" --includedir 2>/dev/null || echo /usr/include/postgresql)
    [[ -f $inc/libpq-fe.h ]] || inc=/usr/include/postgresql
    cc -O2 -Wall -o "$WORK/latency" "$BENCH_DIR/latency.c" -I"$inc" -lpq -lhiredis >"$WORK/latency_cc.log" 2>&1 ||
        { cat "$WORK/latency_cc.log" >&2; die "the latency probe (bench/latency.c) did not build"; }
}

# PostgreSQL on port $1 in $WORK/pgdata with cachekit pointed at URL $2 and
# more postgresql.conf lines on stdin; then the extension and $BENCH_ROWS users
bench_pg_start() {
    PG_PORT=$1
    PG_DATA=$WORK/pgdata
    say "PostgreSQL on port $PG_PORT"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust --no-locale -E UTF8 \
        >"$WORK/initdb.log" 2>&1 || die "initdb failed"
    {
        cat <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'cachekit'
synchronous_commit = off
shared_buffers = 1GB
max_wal_size = 4GB
checkpoint_timeout = 30min
cachekit.redis_url = '$2'
cachekit.database = 'postgres'
CONF
        cat
    } >>"$PG_DATA/postgresql.conf"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w -t 120 start >/dev/null \
        || die "PostgreSQL did not start"
    export PGHOST=$WORK PGPORT=$PG_PORT PGUSER=postgres PGDATABASE=postgres
    export PGOPTIONS='-c client_min_messages=warning'
    q "CREATE EXTENSION cachekit"
    q "CREATE TABLE users (id int PRIMARY KEY, email text, team_id int, name text, updated_at timestamptz)"
    q "INSERT INTO users SELECT g, 'u' || g || '@x', g % 100, 'n' || g, now() FROM generate_series(1, $BENCH_ROWS) g"
    q "VACUUM ANALYZE users"
}
q() { "$PG_BIN/psql" -X -qAt -v ON_ERROR_STOP=1 -c "$1"; }

use_url() {    # url
    q "ALTER SYSTEM SET cachekit.redis_url = '$1'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    for ((n = 0; n < 400; n++)); do
        [[ $(q "SELECT redis_connected FROM cachekit_stats") == t ]] && return 0
        sleep 0.05
    done
    die "the worker did not connect to $1"
}
set_trigger() {    # on|off
    q "DROP TRIGGER IF EXISTS bench_trg ON users" >/dev/null
    [[ $1 == off ]] || q "CREATE TRIGGER bench_trg AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}')" >/dev/null
}

res() { echo "$1 $2" >>"$RESULTS"; }

# median and min-max of a result series
summary() {    # key decimals
    grep "^$1 " "$RESULTS" | cut -d' ' -f2 | sort -g | awk -v d="$2" '
        { v[NR] = $1 }
        END { if (NR == 0) { printf "-"; exit }
              m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "%.*f (%.*f-%.*f)", d, m, d, v[1], d, v[NR] }'
}

# a backlog of $DRAIN_ENTRIES one-key queue entries built while the worker
# points at a dead port; $1 is a command that then creates the keys in Redis
drain_backlog() {
    set_trigger off
    q "SELECT cachekit_wait('10 minutes')" >/dev/null
    q "VACUUM cachekit_queue" >/dev/null
    q "ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
    # one entry per key, as single-row transactions leave them (cachekit_delete
    # calls in one statement would be gathered into few entries)
    q "INSERT INTO cachekit_queue (kind, keys) SELECT 'i', ARRAY['k:' || g] FROM generate_series(0, $((DRAIN_ENTRIES - 1))) g" >/dev/null
    "$@"
    q "CHECKPOINT" >/dev/null
}

# point the worker at URL $1 and time until the backlog is delivered: the end
# is seen by polling the worker's counter in short transactions (one long
# wait, cachekit_wait, would hold back the cleanup of the queue's deleted
# entries, which the worker's reads then wade through); prints ms
drain_time() {
    local e0 t0
    q "ALTER SYSTEM SET cachekit.redis_url = '$1'" >/dev/null
    e0=$(q "SELECT entries_delivered FROM cachekit_worker_state()")
    t0=$(now_ms)
    q "SELECT pg_reload_conf()" >/dev/null
    while (($(q "SELECT entries_delivered FROM cachekit_worker_state()") < e0 + DRAIN_ENTRIES)); do
        (($(now_ms) - t0 < 1800000)) || die "drain over $1 did not finish"
        sleep 0.01
    done
    echo $(($(now_ms) - t0))
}
