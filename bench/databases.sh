#!/usr/bin/env bash
# bench/databases.sh -- cachekit serving many databases at once, as root.
#
#   bash bench/databases.sh              full run (about 20 minutes)
#   QUICK=1 bash bench/databases.sh      shorter run (about 12 minutes)
#
# One PostgreSQL server with DB_MAX databases (db01, db02...), each with the
# extension and served by its own worker (cachekit.database = ''), each
# delivering to its own Redis database number of one redis-server.
#   tps   in each of DB_ROUNDS interleaved rounds, for each N of DB_COUNTS
#         (the order turns each round): pgbench writes N databases at once
#         (DB_CLIENTS clients each, single-row UPDATEs), TPS summed, without
#         and then with the row trigger; the per-round figure is the ratio
#         with / without. Printed as the median of the per-round ratios and
#         their min-max. The launcher must not cost the write path anything:
#         the ratio should not fall as N grows.
#   idle  the CPU time the DB_MAX idle database workers use together over
#         IDLE_SECONDS, per 10 s, once they have been idle for IDLE_SETTLE
#         seconds (an idle worker's sleep grows from 5 s to 60 s within
#         about 135 s): utime+stime from /proc/PID/stat (clock ticks) and,
#         finer, the run time from /proc/PID/schedstat; the launcher's
#         apart. Target: <= 2 ms per 10 s for 16 workers.
# The machine's load average is recorded with the figures: on a shared
# machine, re-run on a quiet one.
#
# Environment: DB_PARTS [tps idle], DB_COUNTS [1 4 16], DB_MAX [16],
# DB_ROUNDS [3], DB_CLIENTS [1], TPS_SECONDS [10 / 3], IDLE_SETTLE [150 / 140],
# IDLE_SECONDS [120 / 60],
# BENCH_ROWS [10000], CACHEKIT_PG_BIN, BENCH_SKIP_BUILD=1 (use the installed
# cachekit), BENCH_BUILD_DIR [/tmp/cachekit-bench-build], BENCH_KEEP=1.
# Output also goes to bench/databases-last-run.txt.
{
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then d_tps=3 d_settle=140 d_idle=60; else d_tps=10 d_settle=150 d_idle=120; fi
DB_COUNTS=${DB_COUNTS:-1 4 16}
DB_MAX=${DB_MAX:-16}
DB_ROUNDS=${DB_ROUNDS:-3}
DB_CLIENTS=${DB_CLIENTS:-1}
TPS_SECONDS=${TPS_SECONDS:-$d_tps}
IDLE_SETTLE=${IDLE_SETTLE:-$d_settle}
IDLE_SECONDS=${IDLE_SECONDS:-$d_idle}
BENCH_ROWS=${BENCH_ROWS:-10000}

say() { printf '%s ==> %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/databases.sh: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must be run as root"
for n in $DB_COUNTS; do ((n <= DB_MAX)) || die "DB_COUNTS holds $n, more than DB_MAX ($DB_MAX)"; done

free_port() {
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
dbname() { printf 'db%02d' "$1"; }

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    say "building and installing cachekit (test/setup.sh)"
    CACHEKIT_BUILD_DIR=${BENCH_BUILD_DIR:-/tmp/cachekit-bench-build} CACHEKIT_PG_BIN=$PG_BIN \
        bash "$REPO_DIR/test/setup.sh" >/dev/null
fi

# ---- servers ------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/cachekit-databases-bench.XXXXXX)
chown postgres:postgres "$WORK"
chmod 0755 "$WORK"
REDIS_PID=
cleanup() {
    set +e
    [[ -z ${PG_DATA:-} || ! -f $PG_DATA/postmaster.pid ]] ||
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
    [[ -z $REDIS_PID ]] || { kill "$REDIS_PID"; wait "$REDIS_PID"; } 2>/dev/null
    [[ ${BENCH_KEEP:-0} == 1 ]] && say "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

REDIS_PORT=$(free_port 63990)
PG_PORT=$(free_port 55632)
say "redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no --databases $((DB_MAX + 1)) \
    --save '' --appendonly no --daemonize no --dir "$WORK" --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for ((n = 0; n < 200; n++)); do [[ $(rcli PING 2>/dev/null) == PONG ]] && break; sleep 0.05; done
[[ $(rcli PING 2>/dev/null) == PONG ]] || die "redis-server did not start"

PG_DATA=$WORK/pgdata
say "PostgreSQL on port $PG_PORT, $DB_MAX databases"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust --no-locale -E UTF8 >"$WORK/initdb.log" 2>&1 \
    || die "initdb failed"
cat >>"$PG_DATA/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'cachekit'
synchronous_commit = off
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 30min
max_connections = $((DB_MAX * DB_CLIENTS + 50))
max_worker_processes = $((DB_MAX + 8))
cachekit.database = ''
cachekit.max_databases = $DB_MAX
cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'
EOF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w -t 120 start >/dev/null \
    || die "PostgreSQL did not start"
export PGHOST=$WORK PGPORT=$PG_PORT PGUSER=postgres
export PGOPTIONS='-c client_min_messages=warning'
q() { "$PG_BIN/psql" -X -qAt -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }

for ((i = 1; i <= DB_MAX; i++)); do
    db=$(dbname $i)
    q postgres "CREATE DATABASE $db"
    q postgres "ALTER DATABASE $db SET cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/$i'"
    q "$db" "CREATE EXTENSION cachekit"
    q "$db" "CREATE TABLE users (id int PRIMARY KEY, name text, updated_at timestamptz)"
    q "$db" "INSERT INTO users SELECT g, 'n' || g, now() FROM generate_series(1, $BENCH_ROWS) g"
    q "$db" "VACUUM ANALYZE users"
done
for ((n = 0; n < 600; n++)); do
    [[ $(q postgres "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'") == "$DB_MAX" ]] && break
    sleep 0.1
done
served=$(q postgres "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'")
[[ $served == "$DB_MAX" ]] || die "$served workers run, not $DB_MAX"
printf '\\set id random(1, %d)\nUPDATE users SET name = name, updated_at = now() WHERE id = :id;\n' \
    "$BENCH_ROWS" >"$WORK/update.sql"
chmod 0644 "$WORK/update.sql"

set_trigger() {    # on|off
    local i db
    for ((i = 1; i <= DB_MAX; i++)); do
        db=$(dbname $i)
        q "$db" "DROP TRIGGER IF EXISTS bench_trg ON users"
        [[ $1 == off ]] || q "$db" "CREATE TRIGGER bench_trg AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}')"
    done
}

RESULTS=$WORK/results
res() { echo "$1 $2" >>"$RESULTS"; }

tps_at_once() {    # N -> summed TPS of N databases written at once
    local n=$1 i total=0 t
    q postgres "CHECKPOINT"
    for ((i = 1; i <= n; i++)); do
        runuser -u postgres -- "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -n -M prepared \
            -c "$DB_CLIENTS" -j "$DB_CLIENTS" -T "$TPS_SECONDS" -f "$WORK/update.sql" "$(dbname $i)" \
            >"$WORK/pgbench.$i.out" 2>&1 &
    done
    wait
    for ((i = 1; i <= n; i++)); do
        t=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$WORK/pgbench.$i.out" | head -n 1)
        [[ -n $t ]] || { cat "$WORK/pgbench.$i.out" >&2; die "pgbench failed in $(dbname $i)"; }
        total=$(calc "$total + $t")
    done
    echo "$total"
}

drain_all() {
    local i
    for ((i = 1; i <= DB_MAX; i++)); do q "$(dbname $i)" "SELECT cachekit_wait('10 minutes')" >/dev/null; done
}

tps() {    # N
    local none trig pids c0 c1
    set_trigger off
    none=$(tps_at_once "$1")
    set_trigger on
    mapfile -t pids < <(q postgres "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cachekit worker'")
    c0=$(cpu_sched_ms "${pids[@]}")
    trig=$(tps_at_once "$1")
    c1=$(cpu_sched_ms "${pids[@]}")
    set_trigger off
    drain_all
    res "tps_ratio.$1" "$(calc "$trig / $none")"
    # the delivering workers' CPU while the trigger run lasted, in % of one core
    res "worker_cpu.$1" "$(calc "($c1 - $c0) / ($TPS_SECONDS * 10)")"
    say "    $1 database(s) at once: $trig TPS with the row trigger, $none without (ratio $(calc "$trig / $none")); workers $(calc "($c1 - $c0) / ($TPS_SECONDS * 10)")% of a core"
}

# CPU time of the listed processes, in ms: clock ticks (stat) and run time (schedstat)
cpu_ticks_ms() {
    local pid sum=0 hz; hz=$(getconf CLK_TCK)
    for pid in "$@"; do
        sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    calc "$sum * 1000 / $hz"
}
cpu_sched_ms() {
    local pid sum=0
    for pid in "$@"; do sum=$((sum + $(cut -d' ' -f1 "/proc/$pid/schedstat"))); done
    calc "$sum / 1000000"
}

idle() {
    local pids launcher t0 s0 l0 t1 s1 l1
    set_trigger off
    drain_all
    mapfile -t pids < <(q postgres "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cachekit worker'")
    launcher=$(q postgres "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cachekit launcher'")
    ((${#pids[@]} == DB_MAX)) || die "${#pids[@]} workers run, not $DB_MAX"
    # let them settle into idleness (their growing idle sleep, a vacuum) first
    sleep "$IDLE_SETTLE"
    t0=$(cpu_ticks_ms "${pids[@]}") s0=$(cpu_sched_ms "${pids[@]}") l0=$(cpu_sched_ms "$launcher")
    sleep "$IDLE_SECONDS"
    t1=$(cpu_ticks_ms "${pids[@]}") s1=$(cpu_sched_ms "${pids[@]}") l1=$(cpu_sched_ms "$launcher")
    res idle_stat "$(calc "($t1 - $t0) * 10 / $IDLE_SECONDS")"
    res idle_sched "$(calc "($s1 - $s0) * 10 / $IDLE_SECONDS")"
    res idle_launcher "$(calc "($l1 - $l0) * 10 / $IDLE_SECONDS")"
    say "    $DB_MAX idle workers: $(calc "($s1 - $s0) * 10 / $IDLE_SECONDS") ms CPU per 10 s (schedstat), $(calc "($t1 - $t0) * 10 / $IDLE_SECONDS") ms (stat ticks); launcher $(calc "($l1 - $l0) * 10 / $IDLE_SECONDS") ms"
}

loads=()
for ((r = 1; r <= DB_ROUNDS; r++)); do
    read -r -a counts <<<"$DB_COUNTS"
    # turn the order each round: 1 4 16, 4 16 1, 16 1 4...
    order=("${counts[@]:$(((r - 1) % ${#counts[@]}))}" "${counts[@]:0:$(((r - 1) % ${#counts[@]}))}")
    say "round $r of $DB_ROUNDS (${order[*]} databases; load $(cut -d' ' -f1-3 /proc/loadavg))"
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    for part in ${DB_PARTS:-tps idle}; do
        if [[ $part == tps ]]; then
            for n in "${order[@]}"; do tps "$n"; done
        else
            idle
        fi
    done
done

# median and min-max of a result series
summary() {    # key decimals
    grep "^$1 " "$RESULTS" | cut -d' ' -f2 | sort -g | awk -v d="$2" '
        { v[NR] = $1 }
        END { if (NR == 0) { printf "-"; exit }
              m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "%.*f (%.*f-%.*f)", d, m, d, v[1], d, v[NR] }'
}

{
    echo "cachekit serving many databases, $(date -u '+%Y-%m-%d %H:%M UTC'), $DB_ROUNDS interleaved rounds"
    echo "machine: $(nproc) cores; load average at the start of each round: ${loads[*]}; at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "median (min-max) of the per-round values; $DB_CLIENTS pgbench client(s) per database, $TPS_SECONDS s per run"
    echo
    printf '%-58s %s\n' "figure" "value"
    for n in $DB_COUNTS; do
        printf '%-58s %s\n' "row-trigger TPS / no-trigger TPS, $n database(s) at once" "$(summary "tps_ratio.$n" 3)"
        printf '%-58s %s\n' "  delivering workers' CPU meanwhile, % of one core" "$(summary "worker_cpu.$n" 1)"
    done
    printf '%-58s %s\n' "CPU of $DB_MAX idle workers, ms per 10 s (schedstat)" "$(summary idle_sched 3) (target <= 2)"
    printf '%-58s %s\n' "CPU of $DB_MAX idle workers, ms per 10 s (stat ticks)" "$(summary idle_stat 1)"
    printf '%-58s %s\n' "CPU of the launcher, ms per 10 s (schedstat)" "$(summary idle_launcher 3)"
} | tee "$BENCH_DIR/databases-last-run.txt"
}
