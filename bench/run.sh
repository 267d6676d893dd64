#!/usr/bin/env bash
# bench/run.sh -- cachekit benchmark: one command, run as root.
#
#   bash bench/run.sh                 full run (about 30-35 minutes)
#   QUICK=1 bash bench/run.sh         smoke run (about 3 minutes)
#
# Builds and installs cachekit (test/setup.sh), installs what the
# alternatives need (memcached + pgmemcache from Debian, pg + ioredis from
# npm into bench/node), starts its own PostgreSQL 15 and redis-server (and
# memcached) in a temporary folder, runs the scenarios described in
# bench/README.md, and prints one table of figures, ratios and verdicts,
# also written to bench/last-run.txt. Every server and helper it started is
# stopped on exit, also after an error or Ctrl-C.
#
# Environment (defaults in brackets, QUICK=1 values after the slash):
#   BENCH_SECONDS     length of one pgbench TPS run [20 / 3]
#   WARMUP_SECONDS    uncounted pgbench run before them [10 / 1]
#   BENCH_ROUNDS      interleaved rounds of the TPS scenarios [3 / 3]
#   BENCH_CLIENTS     pgbench -c and -j [2]
#   BENCH_PROTOCOL    pgbench -M: simple, extended or prepared [prepared]
#   BENCH_ROWS        rows of the users table [100000]
#   BULK_RUNS         runs of each whole-table UPDATE variant [3 / 1]
#   LAT_SAMPLES       commit-to-delete samples [1000 / 200]
#   LAT_RATE          background load during them, updates/s [300]
#   DRAIN_ENTRIES     backlog size for the drain test [1000000 / 100000]
#   DRAIN_ROUNDS      rounds of the drain test (both batch sizes) [2 / 1]
#   DRAIN_WAIT        how the drain's end is seen: counter (the worker's
#                     entries_delivered, polled every 2 ms in the server) or
#                     cachekit_wait (one call of it) [counter]
#   DRAIN_ANALYZE=1   ANALYZE the queue once the backlog is built (diagnostic:
#                     the worker's settle statements are planned for a long
#                     queue; its read walks the id index and has no plan)
#   IDLE_SECONDS      idle window [10 / 3]
#   SUSTAIN_SECONDS   sustained-load run [300 / 12]
#   SUSTAIN_PROGRESS  pgbench -P interval of it [10 / 1]
#   SUSTAIN_WINDOW    first and last window compared, seconds [60 / 4]
#   SUSTAIN_REFERENCE=1  also run it without trigger, for the machine's own
#                     drift [1 / 0]
#   SUSTAIN_WARMUP    same load before it, not measured [60 / 3]
#   SUSTAIN_TRIGGER   trigger of it: ck_row, write_through, none, ... [ck_row]
#   BENCH_ONLY        subset of: tps bulk latency drain idle sustain [all]
#   BENCH_TPS_ONLY    subset of the TPS scenarios: none ck_row ck_null
#                     ck_row_redelete outbox notify memcache write_through
#                     none_c16 ck_row_c16 none_tx10 ck_row_tx10 [all]
#                     (issue 15's rows: BENCH_TPS_ONLY="none ck_row ck_null
#                     write_through none_c16 ck_row_c16 none_tx10 ck_row_tx10")
#   BENCH_MANY_CLIENTS  pgbench -c of the *_c16 scenarios (-j 2) [16]
#   BENCH_REDELETE_AFTER  cachekit.redelete_after of ck_row_redelete [500ms]
#   BENCH_SKIP_BUILD=1   use the installed cachekit, do not run test/setup.sh
#   BENCH_NO_MEMCACHE=1  skip the pgmemcache alternative
#   BENCH_NO_NODE=1      skip npm (no pg_notify alternative, no Node drainer)
#   BENCH_PG_PORT [55432], BENCH_REDIS_PORT [63790], BENCH_MC_PORT [11311]:
#                     first port tried for each server
#   BENCH_BUILD_DIR   build folder for test/setup.sh [/tmp/cachekit-bench-build]
#   BENCH_KEEP=1      keep the temporary folder (logs, raw samples)

# The whole script is one brace group: bash reads all of it before running
# it, so editing this file during a run does not disturb the run.
{
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
NODE_DIR=$BENCH_DIR/node
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

# ---- settings -------------------------------------------------------------------
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    d_secs=3 d_warm=1 d_bulk=1 d_lat=200 d_drain=100000 d_drain_rounds=1 d_idle=3 d_sus=12 d_prog=1 d_sus_warm=3 d_sus_win=4 d_sus_ref=0
else
    d_secs=20 d_warm=10 d_bulk=3 d_lat=1000 d_drain=1000000 d_drain_rounds=2 d_idle=10 d_sus=300 d_prog=10 d_sus_warm=60 d_sus_win=60 d_sus_ref=1
fi
BENCH_SECONDS=${BENCH_SECONDS:-$d_secs}
WARMUP_SECONDS=${WARMUP_SECONDS:-$d_warm}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_MANY_CLIENTS=${BENCH_MANY_CLIENTS:-16}
BENCH_CLIENTS=${BENCH_CLIENTS:-2}
BENCH_PROTOCOL=${BENCH_PROTOCOL:-prepared}
BENCH_ROWS=${BENCH_ROWS:-100000}
BULK_RUNS=${BULK_RUNS:-$d_bulk}
LAT_SAMPLES=${LAT_SAMPLES:-$d_lat}
LAT_RATE=${LAT_RATE:-300}
DRAIN_ENTRIES=${DRAIN_ENTRIES:-$d_drain}
DRAIN_ROUNDS=${DRAIN_ROUNDS:-$d_drain_rounds}
DRAIN_WAIT=${DRAIN_WAIT:-counter}
IDLE_SECONDS=${IDLE_SECONDS:-$d_idle}
SUSTAIN_SECONDS=${SUSTAIN_SECONDS:-$d_sus}
SUSTAIN_PROGRESS=${SUSTAIN_PROGRESS:-$d_prog}
SUSTAIN_WARMUP=${SUSTAIN_WARMUP:-$d_sus_warm}
SUSTAIN_WINDOW=${SUSTAIN_WINDOW:-$d_sus_win}
SUSTAIN_REFERENCE=${SUSTAIN_REFERENCE:-$d_sus_ref}
BENCH_ONLY=${BENCH_ONLY:-tps bulk latency drain idle sustain}
BENCH_BUILD_DIR=${BENCH_BUILD_DIR:-/tmp/cachekit-bench-build}

# the issue's trigger templates
CK_INVALIDATE_ARGS="'user:{id}', 'tag=team:{team_id}'"
CK_WRITE_THROUGH_ARGS="'key=user:{id}', 'ttl=300', 'columns=id,email,team_id,name,updated_at', 'tag=team:{team_id}'"

# ---- state ----------------------------------------------------------------------
WORK=
PG_DATA=
REDIS_PID=
MC_PID=
NODE_OK=0
MC_OK=0
START_EPOCH=$(date +%s)

say() { printf '%s ==> %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '%s !!! %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }
wants() { [[ " $BENCH_ONLY " == *" $1 "* ]]; }

for v in BENCH_SECONDS WARMUP_SECONDS BENCH_ROUNDS BENCH_CLIENTS BENCH_MANY_CLIENTS BENCH_ROWS BULK_RUNS LAT_SAMPLES LAT_RATE \
         DRAIN_ENTRIES DRAIN_ROUNDS IDLE_SECONDS SUSTAIN_SECONDS SUSTAIN_PROGRESS SUSTAIN_WARMUP SUSTAIN_WINDOW; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive whole number (got '${!v}')"
done
((BENCH_ROWS > 1000)) || die "BENCH_ROWS must be above 1000 (the latency test uses the last 1000 ids)"
case $DRAIN_WAIT in counter | cachekit_wait) ;; *) die "DRAIN_WAIT must be counter or cachekit_wait" ;; esac
case $BENCH_PROTOCOL in simple | extended | prepared) ;; *) die "BENCH_PROTOCOL must be simple, extended or prepared" ;; esac
[[ $(id -u) -eq 0 ]] || die "must be run as root (it installs packages and starts servers as postgres)"

# ---- helper processes: started in the background, remembered, stopped --------
# $WORK/helpers lists "pid starttime name" of every helper started; a pid is
# only signalled while /proc still shows the same process (same start time).
proc_start_time() { awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null; }

helper_start() {    # name logfile command...  -> prints the pid
    local name=$1 log=$2 pid
    shift 2
    "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    echo "$pid $(proc_start_time "$pid") $name" >>"$WORK/helpers"
    echo "$pid"
}

helper_alive() {    # pid -> true while it is our process
    local pid=$1 st
    [[ -f $WORK/helpers ]] || return 1
    st=$(awk -v p="$pid" '$1 == p { print $2 }' "$WORK/helpers" | tail -n 1)
    [[ -n $st && $(proc_start_time "$pid") == "$st" ]]
}

helper_stop() {     # pid [signal]
    local pid=$1 sig=${2:-TERM} n
    helper_alive "$pid" || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((n = 0; n < 50; n++)); do helper_alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    for ((n = 0; n < 20; n++)); do helper_alive "$pid" || return 0; sleep 0.1; done
}

helpers_stop_all() {
    local pid rest
    [[ -n $WORK && -f $WORK/helpers ]] || return 0
    while read -r pid rest; do helper_stop "$pid"; done < <(tac "$WORK/helpers")
}

# ---- cleanup ----------------------------------------------------------------------
# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$? n pid
    trap - EXIT INT TERM ERR
    set +e
    helpers_stop_all
    if [[ -n $PG_DATA && -f $PG_DATA/postmaster.pid ]]; then
        pid=$(head -n 1 "$PG_DATA/postmaster.pid")
        say "stopping PostgreSQL (pid $pid)"
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null 2>&1
        for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null
            sleep 2
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
    fi
    for pid in "$MC_PID" "$REDIS_PID"; do
        if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then continue; fi
        say "stopping pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-40))"
        kill -TERM "$pid" 2>/dev/null
        for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 && -f $WORK/postgres.log ]]; then
            printf '\n----- PostgreSQL log (last 30 lines) -----\n' >&2
            tail -n 30 "$WORK/postgres.log" >&2
        fi
        if [[ ${BENCH_KEEP:-0} == 1 ]]; then
            say "kept $WORK"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'printf "bench/run.sh: line %s: command failed: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---- small tools ----------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_in_use "$p"; do
        p=$((p + 1))
        ((p < $1 + 200)) || die "no free port near $1"
    done
    echo "$p"
}

# psql as the postgres role over the private socket; prints bare values
q() { "$PG_BIN/psql" -X -qAt -v ON_ERROR_STOP=1 -c "$1"; }
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --no-auth-warning "$@"; }
now_ms() { date +%s%3N; }

# results: one "key value" line per measurement in $WORK/results
res_add() { printf '%s %s\n' "$1" "$2" >>"$WORK/results"; }
res_all() { awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print }' "$WORK/results" 2>/dev/null; }
res_last() { res_all "$1" | tail -n 1; }
# median of the numeric values of a key (empty when there is none)
res_median() {
    res_all "$1" | awk '$1 ~ /^-?[0-9.]+$/ { print $1 }' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# "a/b/c" in measurement order, numbers with $2 decimals (default 0)
res_list() {
    res_all "$1" | awk -v d="${2:-0}" '{ printf "%s%s", (NR > 1 ? "/" : ""), ($1 ~ /^-?[0-9.]+$/ ? sprintf("%.*f", d, $1) : $1) } END { if (NR) print "" }'
}

# arithmetic on decimals (empty when an operand is empty)
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
fmt() {    # fmt decimals value
    [[ -n ${2:-} ]] || { echo n/a; return; }
    awk -v d="$1" -v v="$2" 'BEGIN { printf "%.*f", d, v }'
}
ratio() { [[ -n ${1:-} && -n ${2:-} ]] && awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) exit; printf "%.6f", a / b }' || true; }
# per-round ratios of key $1 to key $2 (the nth value of each, same round):
# "median min max", empty when there is none
round_ratios() {
    paste -d' ' <(res_all "$1") <(res_all "$2") | awk 'NF == 2 && $2 > 0 { print $1 / $2 }' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) exit; m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.4f %.4f %.4f", m, v[1], v[NR] }'
}
# "lo-hi" of round_ratios' answer, n/a when empty
min_max() { [[ -n ${1:-} ]] && echo "$1" | awk '{ printf "%.3f-%.3f", $2, $3 }' || echo n/a; }
# verdict value op limit [limit2] -> PASS / MISS / n/a
verdict() {
    [[ -n ${1:-} ]] || { echo n/a; return; }
    awk -v v="$1" -v op="$2" -v a="$3" -v b="${4:-0}" 'BEGIN {
        ok = (op == ">=") ? v >= a : (op == "<=") ? v <= a : (v >= a && v <= b)
        print ok ? "PASS" : "MISS" }'
}

# ---- build and install ------------------------------------------------------------
install_packages() {    # best effort: prints what is missing after trying
    local missing=() pkg status
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ $status == installed ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null ||
        { apt-get update -q </dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null; }
    } >"/tmp/cachekit-bench-apt.$$.log" 2>&1 || { rm -f "/tmp/cachekit-bench-apt.$$.log"; return 1; }
    rm -f "/tmp/cachekit-bench-apt.$$.log"
}

# the source that is built (the report is written at the end, when the
# checkout may have moved on)
git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$REPO_DIR" diff --quiet HEAD -- src sql 2>/dev/null || git_rev="$git_rev+local changes"
[[ ${BENCH_SKIP_BUILD:-0} != 1 ]] || git_rev="installed build (checkout at $git_rev)"

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    say "building and installing cachekit (test/setup.sh, build folder $BENCH_BUILD_DIR)"
    CACHEKIT_BUILD_DIR=$BENCH_BUILD_DIR bash "$REPO_DIR/test/setup.sh" >/dev/null
fi
[[ -f $("$PG_BIN/pg_config" --pkglibdir)/cachekit.so ]] || die "cachekit is not installed"
install_packages postgresql-15 redis-server redis-tools || die "could not install PostgreSQL/Redis packages"
[[ -x $PG_BIN/pgbench ]] || die "$PG_BIN/pgbench is missing"

if [[ ${BENCH_NO_MEMCACHE:-0} != 1 ]]; then
    if install_packages postgresql-15-pgmemcache memcached &&
        [[ -f $("$PG_BIN/pg_config" --pkglibdir)/pgmemcache.so ]] && command -v memcached >/dev/null; then
        MC_OK=1
    else
        warn "postgresql-15-pgmemcache or memcached could not be installed: the pgmemcache alternative is skipped"
    fi
fi

if [[ ${BENCH_NO_NODE:-0} != 1 ]]; then
    if command -v node >/dev/null && command -v npm >/dev/null; then
        say "npm install in bench/node (pg, ioredis)"
        if (cd "$NODE_DIR" && npm install --no-audit --no-fund --no-package-lock --loglevel=error \
                >/dev/null 2>"/tmp/cachekit-bench-npm.$$.log") &&
            (cd "$NODE_DIR" && node -e "require('pg'); require('ioredis')") 2>/dev/null; then
            NODE_OK=1
        else
            warn "npm install failed: the pg_notify alternative and the Node drainer are skipped"
            sed 's/^/    /' "/tmp/cachekit-bench-npm.$$.log" >&2 || true
        fi
        rm -f "/tmp/cachekit-bench-npm.$$.log"
    else
        warn "node/npm not found: the pg_notify alternative and the Node drainer are skipped"
    fi
fi

# ---- servers ------------------------------------------------------------------
PG_PORT=$(free_port "${BENCH_PG_PORT:-55432}")
REDIS_PORT=$(free_port "${BENCH_REDIS_PORT:-63790}")
MC_PORT=$(free_port "${BENCH_MC_PORT:-11311}")

WORK=$(mktemp -d /tmp/cachekit-bench.XXXXXX)
chown postgres:postgres "$WORK"
chmod 0755 "$WORK"
mkdir "$WORK/logs"
PG_DATA=$WORK/pgdata
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

say "starting redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no \
    --save '' --appendonly no --daemonize no --dir "$WORK" \
    --enable-debug-command local \
    --logfile "$WORK/redis.log" --pidfile "$WORK/redis.pid" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
for ((n = 0; ; n++)); do
    kill -0 "$REDIS_PID" 2>/dev/null || { tail -n 20 "$WORK/redis.log" >&2; die "redis-server exited"; }
    if [[ $(rcli PING 2>/dev/null) == PONG ]] &&
        rcli --raw INFO server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$REDIS_PID"; then
        break
    fi
    ((n < 200)) || die "redis-server did not answer PING within 10 seconds"
    sleep 0.05
done

if ((MC_OK)); then
    say "starting memcached on 127.0.0.1:$MC_PORT"
    memcached -l 127.0.0.1 -p "$MC_PORT" -U 0 -u nobody -m 64 </dev/null >"$WORK/memcached.log" 2>&1 &
    MC_PID=$!
    mc_up=0
    for ((n = 0; n < 100; n++)); do
        kill -0 "$MC_PID" 2>/dev/null || break
        if { exec 5<>"/dev/tcp/127.0.0.1/$MC_PORT"; } 2>/dev/null; then
            printf 'version\r\n' >&5
            read -r -t 2 line <&5 || line=
            exec 5<&- 5>&-
            [[ $line == VERSION* ]] && { mc_up=1; MC_VERSION=${line#VERSION }; MC_VERSION=${MC_VERSION%$'\r'}; break; }
        fi
        sleep 0.05
    done
    if ((!mc_up)); then
        warn "memcached did not start: the pgmemcache alternative is skipped"
        MC_OK=0
    fi
fi

say "starting PostgreSQL on port $PG_PORT (data in $PG_DATA)"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust \
    --no-locale -E UTF8 >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$PG_DATA/postgresql.conf" <<EOF

# ---- cachekit benchmark (bench/run.sh) ----
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'cachekit'
synchronous_commit = off
shared_buffers = 1GB
max_wal_size = 4GB
# runs start with an explicit CHECKPOINT; no timed one in the middle of a run
checkpoint_timeout = 30min
cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'
cachekit.database = 'postgres'
log_line_prefix = '%m [%p] %q%a '
log_autovacuum_min_duration = 0
EOF
if ((MC_OK)); then
    echo "pgmemcache.default_servers = '127.0.0.1:$MC_PORT'" >>"$PG_DATA/postgresql.conf"
fi
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w -t 120 start >/dev/null \
    || die "PostgreSQL did not start"
export PGHOST=$WORK PGPORT=$PG_PORT PGUSER=postgres PGDATABASE=postgres
export PGOPTIONS='-c client_min_messages=warning'

# ---- schema -----------------------------------------------------------------------
say "creating users ($BENCH_ROWS rows), cachekit and the alternatives' objects"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -v rows="$BENCH_ROWS" >"$WORK/logs/schema.log" 2>&1 <<'EOF'
-- never_set: always NULL, for the reference trigger that fires without enqueueing
CREATE TABLE users (id int PRIMARY KEY, email text, team_id int, name text, updated_at timestamptz,
                    never_set text);
INSERT INTO users
SELECT g, 'user' || g || '@example.com', g % 100, 'User ' || g, now()
FROM generate_series(1, :rows) g;
VACUUM (ANALYZE) users;

CREATE EXTENSION cachekit;

-- (a) transactional outbox filled by a PL/pgSQL trigger, drained by a poller
CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, key text NOT NULL, tag text);
CREATE FUNCTION bench_outbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO bench_outbox (key, tag) VALUES ('user:' || OLD.id, 'team:' || OLD.team_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (NEW.id, NEW.team_id) IS DISTINCT FROM (OLD.id, OLD.team_id)) THEN
        INSERT INTO bench_outbox (key, tag) VALUES ('user:' || NEW.id, 'team:' || NEW.team_id);
    END IF;
    RETURN NULL;
END $$;

-- (b) pg_notify from a trigger, a listener deletes
-- reference for target 2: a statement trigger that does nothing with the
-- same transition tables, i.e. what PostgreSQL's own capture of them costs
CREATE FUNCTION bench_noop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END $$;

CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('bench_cache', 'user:' || OLD.id || ' team:' || OLD.team_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (NEW.id, NEW.team_id) IS DISTINCT FROM (OLD.id, OLD.team_id)) THEN
        PERFORM pg_notify('bench_cache', 'user:' || NEW.id || ' team:' || NEW.team_id);
    END IF;
    RETURN NULL;
END $$;

-- The two waits below are procedures that COMMIT at every step: a function
-- would keep one snapshot for the whole wait, and that snapshot would stop
-- VACUUM and index scans from getting rid of the rows the drainer or the
-- worker delete meanwhile, slowing both down more and more.

-- wait until the outbox is empty; ms = the milliseconds that took (NULL on timeout)
CREATE PROCEDURE bench_outbox_wait(timeout_s int, INOUT ms double precision DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
BEGIN
    COMMIT;
    WHILE EXISTS (SELECT FROM bench_outbox) LOOP
        IF clock_timestamp() - t0 > make_interval(secs => timeout_s) THEN
            RETURN;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.002);
    END LOOP;
    ms := 1000 * extract(epoch FROM clock_timestamp() - t0);
END $$;

-- drain test: reload the settings, then wait until the worker has delivered
-- "target" entries in all; ms = the milliseconds that took (NULL on timeout)
CREATE PROCEDURE bench_drain_wait(target bigint, timeout_s int, INOUT ms double precision DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    done bigint;
BEGIN
    PERFORM pg_reload_conf();
    COMMIT;
    LOOP
        SELECT entries_delivered INTO done FROM cachekit_worker_state();
        EXIT WHEN done >= target;
        IF clock_timestamp() - t0 > make_interval(secs => timeout_s) THEN
            RETURN;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.002);
    END LOOP;
    ms := 1000 * extract(epoch FROM clock_timestamp() - t0);
END $$;
EOF

if ((MC_OK)); then
    # (c) pgmemcache: delete synchronously from the trigger
    if ! "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 >"$WORK/logs/pgmemcache.log" 2>&1 <<'EOF'
CREATE EXTENSION pgmemcache;
CREATE FUNCTION bench_memcache_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM memcache_delete('user:' || OLD.id);
        PERFORM memcache_delete('tag:team:' || OLD.team_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (NEW.id, NEW.team_id) IS DISTINCT FROM (OLD.id, OLD.team_id)) THEN
        PERFORM memcache_delete('user:' || NEW.id);
        PERFORM memcache_delete('tag:team:' || NEW.team_id);
    END IF;
    RETURN NULL;
END $$;
SELECT memcache_set('bench:probe', 'x');
SELECT memcache_delete('bench:probe');
EOF
    then
        warn "pgmemcache does not work here (see below): its alternative is skipped"
        sed 's/^/    /' "$WORK/logs/pgmemcache.log" >&2
        MC_OK=0
    fi
fi

# the worker must be running and deliver to our Redis
q "SELECT cachekit_delete('bench:warmup')" >/dev/null
[[ $(q "SELECT cachekit_wait('30 seconds')") == t ]] || die "the cachekit worker did not deliver within 30 seconds"
[[ -n $(q "SELECT worker_pid FROM cachekit_stats") ]] || die "the cachekit worker is not running"

cat >"$WORK/update.sql" <<EOF
\\set id random(1, $BENCH_ROWS)
UPDATE users SET name = name || '', updated_at = now() WHERE id = :id;
EOF
# background load of the latency test: leaves the last 1000 ids alone
cat >"$WORK/update_bg.sql" <<EOF
\\set id random(1, $((BENCH_ROWS - 1000)))
UPDATE users SET name = name || '', updated_at = now() WHERE id = :id;
EOF

# transactions of 10 single-row UPDATEs (the *_tx10 scenarios)
{
    for ((i = 0; i < 10; i++)); do echo "\\set id$i random(1, $BENCH_ROWS)"; done
    echo "BEGIN;"
    for ((i = 0; i < 10; i++)); do echo "UPDATE users SET name = name || '', updated_at = now() WHERE id = :id$i;"; done
    echo "COMMIT;"
} >"$WORK/update_tx10.sql"

PGBENCH=("$PG_BIN/pgbench" -n -M "$BENCH_PROTOCOL" -c "$BENCH_CLIENTS" -j "$BENCH_CLIENTS")

# ---- per-run helpers -----------------------------------------------------------------
proc_cpu_ns() {    # on-CPU time of a process, all its threads, in ns
    local t sum=0 v
    for t in /proc/"$1"/task/*/schedstat; do
        read -r v _ <"$t" 2>/dev/null || continue
        sum=$((sum + v))
    done
    if ((sum == 0)) && [[ ! -r /proc/$1/task/$1/schedstat ]]; then
        # no schedstat: clock ticks of utime + stime
        sum=$(awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.0f", ($12 + $13) * 1e9 / hz }' "/proc/$1/stat")
    fi
    echo "$sum"
}
# CPU of the server's exited children (backends), ms: the postmaster's
# cutime + cstime; with the worker's and Redis's, the server side's CPU of a
# run, which other processes on the machine do not change much
pm_children_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.0f", ($14 + $15) * 1000 / hz }' "/proc/$(head -n 1 "$PG_DATA/postmaster.pid")/stat"
}
proc_switches() { awk '/^voluntary_ctxt_switches/ { print $2 }' "/proc/$1/status"; }

worker_counter() { q "SELECT $1 FROM cachekit_worker_state()"; }

# the trigger of a scenario on users (bench_trg), replacing any other
set_trigger() {
    local body
    case $1 in
        none | none_c16 | none_tx10) body= ;;
        ck_row | ck_row_redelete | ck_row_c16 | ck_row_tx10) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate($CK_INVALIDATE_ARGS)" ;;
        # the reference: cachekit's C function fires, renders only NULL, enqueues nothing
        ck_null) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{never_set}')" ;;
        ck_stmt) body="AFTER UPDATE ON users REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate($CK_INVALIDATE_ARGS)" ;;
        noop_stmt) body="AFTER UPDATE ON users REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bench_noop()" ;;
        write_through) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION cachekit_write_through($CK_WRITE_THROUGH_ARGS)" ;;
        outbox) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION bench_outbox_enqueue()" ;;
        notify) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION bench_notify()" ;;
        memcache) body="AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION bench_memcache_delete()" ;;
        *) die "unknown trigger $1" ;;
    esac
    q "DROP TRIGGER IF EXISTS bench_trg ON users" >/dev/null
    [[ -z $body ]] || q "CREATE TRIGGER bench_trg $body" >/dev/null
}

# the same starting point for every run: empty queues, vacuumed tables, a
# fresh checkpoint, and Redis holding user:0..user:<rows> (so deletes delete)
prepare_run() {
    set_trigger none
    ck_wait_ms >/dev/null
    q "TRUNCATE bench_outbox" >/dev/null
    q "VACUUM (ANALYZE) users" >/dev/null
    q "VACUUM cachekit_queue" >/dev/null
    q "CHECKPOINT" >/dev/null
    rcli FLUSHALL >/dev/null
    rcli DEBUG POPULATE "$((BENCH_ROWS + 1))" user >/dev/null
}

# pgbench with the TPS options; leaves its output in $1
run_pgbench() {    # logfile extra-args...
    local log=$1
    shift
    "${PGBENCH[@]}" "$@" >"$log" 2>&1 || { sed 's/^/    /' "$log" >&2; return 1; }
}
pgbench_tps() { sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$1" | head -n 1; }
pgbench_txns() { sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -n 1; }

# ms until every entry committed so far is delivered (cachekit_wait)
ck_wait_ms() {
    local out
    out=$(q "SELECT w, round(1000 * extract(epoch FROM clock_timestamp() - statement_timestamp())) FROM cachekit_wait('10 minutes') w")
    [[ ${out%%|*} == t ]] || warn "the cachekit queue was not drained after 10 minutes"
    echo "${out#*|}"
}

# a counter from memcached's "stats"
mc_stat() {
    local line v=
    exec 6<>"/dev/tcp/127.0.0.1/$MC_PORT"
    printf 'stats\r\n' >&6
    while read -r -t 5 line <&6; do
        line=${line%$'\r'}
        [[ $line == END ]] && break
        [[ $line == "STAT $1 "* ]] && v=${line#"STAT $1 "}
    done
    exec 6<&- 6>&-
    echo "${v:-0}"
}

mc_deletes() { echo $(($(mc_stat delete_hits) + $(mc_stat delete_misses))); }

count_file_value() { [[ -s $1 ]] && cut -d' ' -f1 "$1" || echo 0; }

# wait until a helper's count file reaches a number; prints the ms it took
wait_count() {    # file target timeout_s
    local t0 v
    t0=$(now_ms)
    while :; do
        v=$(count_file_value "$1")
        ((v >= $2)) && break
        (($(now_ms) - t0 > $3 * 1000)) && { warn "gave up waiting for $1 to reach $2 (at $v)"; break; }
        sleep 0.02
    done
    echo $(($(now_ms) - t0))
}

# ---- 1 + 7: pgbench TPS, interleaved -------------------------------------------------
TPS_SCENARIOS=(none ck_row ck_null ck_row_redelete outbox)
((NODE_OK)) && TPS_SCENARIOS+=(notify)
((MC_OK)) && TPS_SCENARIOS+=(memcache)
TPS_SCENARIOS+=(write_through none_c16 ck_row_c16 none_tx10 ck_row_tx10)
if [[ -n ${BENCH_TPS_ONLY:-} ]]; then
    only=()
    for s in "${TPS_SCENARIOS[@]}"; do [[ " $BENCH_TPS_ONLY " != *" $s "* ]] || only+=("$s"); done
    TPS_SCENARIOS=("${only[@]}")
fi

# ck_row_redelete: the row trigger with cachekit.redelete_after (a second
# delete of every key and tag); every other scenario runs with it off
set_redelete() {    # scenario
    if [[ $1 == ck_row_redelete ]]; then
        q "ALTER SYSTEM SET cachekit.redelete_after = '${BENCH_REDELETE_AFTER:-500ms}'" >/dev/null
    else
        q "ALTER SYSTEM RESET cachekit.redelete_after" >/dev/null
    fi
    q "SELECT pg_reload_conf()" >/dev/null
}

tps_run() {    # scenario round
    local s=$1 r=$2 log=$WORK/logs/tps.$1.$2.log helper='' cf='' tps txns backlog catchup failed0 failed1 mc0 mc1
    local wpid apid a0 r0 t0 t1 e0 b0 rows=1 args=(-f "$WORK/update.sql")
    case $s in
        *_c16) args=(-c "$BENCH_MANY_CLIENTS" -j 2 -f "$WORK/update.sql") ;;
        *_tx10) args=(-f "$WORK/update_tx10.sql") rows=10 ;;
    esac
    prepare_run
    set_trigger "$s"
    set_redelete "$s"
    case $s in
        outbox)
            cf=$WORK/outbox.$r.count
            if ((NODE_OK)); then
                helper=$(helper_start outbox_drainer "$WORK/logs/drainer.$r.log" \
                    env REDIS_PORT="$REDIS_PORT" COUNT_FILE="$cf" node "$NODE_DIR/outbox_drainer.js")
            else
                helper=$(helper_start outbox_drainer "$WORK/logs/drainer.$r.log" \
                    env REDIS_PORT="$REDIS_PORT" COUNT_FILE="$cf" bash "$BENCH_DIR/outbox_drainer.sh")
            fi
            ;;
        notify)
            cf=$WORK/notify.$r.count
            helper=$(helper_start notify_listener "$WORK/logs/listener.$r.log" \
                env REDIS_PORT="$REDIS_PORT" COUNT_FILE="$cf" node "$NODE_DIR/notify_listener.js")
            ;;
    esac
    if [[ -n $cf ]]; then
        for ((n = 0; n < 200; n++)); do [[ -s $cf ]] && break; helper_alive "$helper" || break; sleep 0.05; done
        [[ -s $cf ]] || { sed 's/^/    /' "$WORK"/logs/*."$r".log >&2; die "the $s helper did not start"; }
    fi
    failed0=$(worker_counter failed_attempts)
    [[ $s != memcache ]] || mc0=$(mc_deletes)
    # CPU of what works beside the backends: the worker (or the drainer or
    # listener or memcached) and Redis, as % of one core over the run
    wpid=$(q "SELECT worker_pid FROM cachekit_stats")
    case $s in
        outbox | notify) apid=$helper ;;
        memcache) apid=$MC_PID ;;
        *) apid=$wpid ;;
    esac
    e0=$(worker_counter entries_delivered)
    b0=$(pm_children_ms)
    a0=$(proc_cpu_ns "$apid")
    r0=$(proc_cpu_ns "$REDIS_PID")
    t0=$(now_ms)

    say "round $r: $s (pgbench ${BENCH_SECONDS}s)"
    run_pgbench "$log" -T "$BENCH_SECONDS" "${args[@]}"
    t1=$(now_ms)
    res_add "cpu_async.$s" "$(calc "($(proc_cpu_ns "$apid") - $a0) / 1e4 / ($t1 - $t0)")"
    res_add "cpu_redis.$s" "$(calc "($(proc_cpu_ns "$REDIS_PID") - $r0) / 1e4 / ($t1 - $t0)")"
    tps=$(pgbench_tps "$log")
    txns=$(pgbench_txns "$log")
    [[ -n $tps ]] || { cat "$log" >&2; return 1; }

    # what was left to deliver when pgbench ended, and how long it took
    backlog=0 catchup=0
    case $s in
        ck_* | write_through)
            backlog=$(q "SELECT count(*) FROM cachekit_queue")
            catchup=$(ck_wait_ms)
            # CPU of the worker and Redis per 10k changed rows, catch-up
            # included; and the queue entries those rows made
            res_add "cpu10k_worker.$s" "$(calc "($(proc_cpu_ns "$wpid") - $a0) / 1e6 / ($txns * $rows) * 1e4")"
            res_add "cpu10k_redis.$s" "$(calc "($(proc_cpu_ns "$REDIS_PID") - $r0) / 1e6 / ($txns * $rows) * 1e4")"
            res_add "entries.$s" "$(calc "($(worker_counter entries_delivered) - $e0) / ($txns * $rows)")"
            ;;
        outbox)
            backlog=$(q "SELECT count(*) FROM bench_outbox")
            helper_alive "$helper" || { sed 's/^/    /' "$WORK/logs/drainer.$r.log" >&2; warn "the outbox drainer died"; return 1; }
            catchup=$(q "CALL bench_outbox_wait(600)")
            [[ -n $catchup ]] || { warn "outbox not drained after 10 minutes"; catchup=timeout; }
            ;;
        memcache)
            mc1=$(mc_deletes)
            res_add "mc_deletes" "$((mc1 - mc0))"
            ;;
        notify)
            backlog=$((txns - $(count_file_value "$cf")))
            catchup=$(wait_count "$cf" "$txns" 600)
            [[ $(cut -d' ' -f2 "$cf") == 0 ]] || warn "the listener saw failed DELs"
            ;;
    esac
    # server CPU per transaction: backends (exited by now), worker, Redis
    sleep 0.3
    res_add "cpu_txn.$s" "$(calc "(($(pm_children_ms) - $b0) * 1000 + ($(proc_cpu_ns "$wpid") - $a0) / 1000 + ($(proc_cpu_ns "$REDIS_PID") - $r0) / 1000) / $txns")"
    [[ -z $helper ]] || helper_stop "$helper"
    failed1=$(worker_counter failed_attempts)
    ((failed1 == failed0)) || warn "$s: the cachekit worker counted $((failed1 - failed0)) failed attempts"

    res_add "tps.$s" "$tps"
    res_add "backlog.$s" "$backlog"
    res_add "catchup.$s" "$catchup"
    say "    $s: $(fmt 0 "$tps") TPS; backlog at end $backlog, delivered ${catchup} ms later; CPU % of a core: $(res_last "cpu_async.$s" | cut -d. -f1) async, $(res_last "cpu_redis.$s" | cut -d. -f1) redis"
}

tps_part() {
    local r s
    prepare_run
    say "warm-up: pgbench without trigger for ${WARMUP_SECONDS}s (not counted)"
    run_pgbench "$WORK/logs/warmup.log" -T "$WARMUP_SECONDS" -f "$WORK/update.sql"
    for ((r = 1; r <= BENCH_ROUNDS; r++)); do
        for s in "${TPS_SCENARIOS[@]}"; do tps_run "$s" "$r"; done
    done
}

# ---- 2: one UPDATE of every row --------------------------------------------------------
bulk_run() {    # variant round
    local v=$1 r=$2 out=$WORK/logs/bulk.$1.$2.log upd wait e0 e1 k0 k1 left
    prepare_run
    set_trigger "$v"
    e0=$(worker_counter entries_delivered)
    k0=$(worker_counter keys_deleted)
    say "round $r: UPDATE of all $BENCH_ROWS rows, trigger $v"
    if ! "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 >"$out" 2>&1 <<'EOF'
\timing on
UPDATE users SET updated_at = now();
SELECT cachekit_wait('30 minutes') AS delivered;
EOF
    then
        res_add "bulk_err.$v" "$(grep -m1 ERROR "$out" | cut -c1-100)"
        warn "    $v: $(grep -m1 ERROR "$out")"
        return 0
    fi
    upd=$(grep -m1 '^Time:' "$out" | awk '{ print $2 }')
    wait=$(grep '^Time:' "$out" | sed -n 2p | awk '{ print $2 }')
    grep -q '^ t$' "$out" || warn "    $v: cachekit_wait did not return true"
    e1=$(worker_counter entries_delivered)
    k1=$(worker_counter keys_deleted)
    left=$(($(rcli DBSIZE) - 1))    # user:0 is no row of the table
    res_add "bulk.$v" "$upd"
    res_add "bulk_done.$v" "$(calc "$upd + $wait")"
    res_add "bulk_entries.$v" "$((e1 - e0))"
    res_add "bulk_keys.$v" "$((k1 - k0))"
    res_add "bulk_left.$v" "$left"
    say "    $v: UPDATE $(fmt 0 "$upd") ms, delivered after $(fmt 0 "$(calc "$upd + $wait")") ms; $((e1 - e0)) queue entries, $left cached rows left"
}

bulk_part() {
    local r v
    for ((r = 1; r <= BULK_RUNS; r++)); do
        for v in none noop_stmt ck_stmt ck_row; do bulk_run "$v" "$r"; done
    done
    set_trigger none
}

# ---- 3: COMMIT -> key gone ------------------------------------------------------------
latency_part() {
    local bg out=$WORK/logs/latency.out probe=$WORK/latency inc
    # the probe (bench/latency.c) times both sockets in one poll loop: no
    # client event loop between the COMMIT's reply and the del event
    inc=$("$PG_BIN/pg_config" --includedir 2>/dev/null || echo /usr/include/postgresql)
    [[ -f $inc/libpq-fe.h ]] || inc=/usr/include/postgresql
    cc -O2 -Wall -o "$probe" "$BENCH_DIR/latency.c" -I"$inc" -lpq -lhiredis >"$WORK/logs/latency_cc.log" 2>&1 ||
        { cat "$WORK/logs/latency_cc.log" >&2; warn "latency probe did not build: latency test skipped"; return 0; }
    prepare_run
    set_trigger ck_row
    say "latency: $LAT_SAMPLES samples with a background load of $LAT_RATE updates/s"
    bg=$(helper_start pgbench_bg "$WORK/logs/latency_bg.log" \
        "${PGBENCH[@]}" -R "$LAT_RATE" -T 3600 -f "$WORK/update_bg.sql")
    sleep 1
    helper_alive "$bg" || { cat "$WORK/logs/latency_bg.log" >&2; return 1; }
    env REDIS_PORT="$REDIS_PORT" SAMPLES="$LAT_SAMPLES" ID_FIRST=$((BENCH_ROWS - 999)) ID_LAST="$BENCH_ROWS" \
        RAW_FILE="$WORK/latency.raw" "$probe" >"$out" 2>&1 || { cat "$out" >&2; helper_stop "$bg"; return 1; }
    helper_stop "$bg" INT
    while IFS='=' read -r k val; do res_add "lat.$k" "$val"; done <"$out"
    say "    p50 $(res_last lat.p50_ms) ms, p99 $(res_last lat.p99_ms) ms ($(res_last lat.samples) samples, $(res_last lat.timeouts) timeouts)"
    set_trigger none
}

# ---- 4: drain of a backlog ------------------------------------------------------------
drain_run() {    # batch_size round
    local b=$1 r=$2 e0 ms depth t0 enq left
    set_trigger none
    [[ $(q "SELECT cachekit_wait('10 minutes')") == t ]] || warn "queue not empty before the drain test"
    q "VACUUM cachekit_queue" >/dev/null
    rcli FLUSHALL >/dev/null

    # the worker loses Redis: it now points at a port nobody listens on
    q "ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
    say "round $r: building a backlog of $DRAIN_ENTRIES entries (Redis unreachable)"
    t0=$(now_ms)
    # one entry per key, as a million single-row transactions would leave
    # (cachekit_delete in one statement would gather them into few entries)
    q "INSERT INTO cachekit_queue (kind, keys) SELECT 'i', ARRAY['k:' || g] FROM generate_series(0, $((DRAIN_ENTRIES - 1))) g" >/dev/null
    enq=$(($(now_ms) - t0))
    rcli DEBUG POPULATE "$DRAIN_ENTRIES" k >/dev/null
    depth=$(q "SELECT count(*) FROM cachekit_queue")
    ((depth == DRAIN_ENTRIES)) || warn "queue holds $depth entries, expected $DRAIN_ENTRIES (was something delivered?)"
    # diagnostic: fresh statistics (and so fresh plans in the worker)
    [[ ${DRAIN_ANALYZE:-0} != 1 ]] || q "ANALYZE cachekit_queue" >/dev/null
    q "CHECKPOINT" >/dev/null

    # Redis is back: time until every entry is delivered
    e0=$(worker_counter entries_delivered)
    q "ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'" >/dev/null
    q "ALTER SYSTEM SET cachekit.batch_size = $b" >/dev/null
    say "    draining with batch_size $b"
    if [[ $DRAIN_WAIT == cachekit_wait ]]; then
        t0=$(now_ms)
        q "SELECT pg_reload_conf()" >/dev/null
        [[ $(q "SELECT cachekit_wait('30 minutes')") == t ]] && ms=$(($(now_ms) - t0)) || ms=
    else
        ms=$(q "CALL bench_drain_wait($((e0 + depth)), 1800)")
    fi
    left=$(rcli DBSIZE)
    depth=$(q "SELECT count(*) FROM cachekit_queue")
    q "ALTER SYSTEM RESET cachekit.batch_size" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    [[ -n $ms ]] || { warn "    the backlog was not drained within 30 minutes"; return 0; }
    ((depth == 0)) || warn "    $depth entries still queued after the drain"
    ((left == 0)) || warn "    $left keys still in Redis after the drain"
    res_add "drain.$b" "$(calc "$DRAIN_ENTRIES / ($ms / 1000)")"
    res_add "drain_ms.$b" "$ms"
    res_add "drain_left.$b" "$left"
    res_add "drain_enqueue_ms" "$enq"
    say "    $(fmt 0 "$(res_last "drain.$b")") keys/s ($(fmt 0 "$ms") ms; enqueue took $enq ms)"
}

drain_part() {
    local r
    for ((r = 1; r <= DRAIN_ROUNDS; r++)); do
        drain_run 1000 "$r"
        drain_run 10000 "$r"
    done
    q "ALTER SYSTEM RESET cachekit.redis_url" >/dev/null
    q "ALTER SYSTEM RESET cachekit.batch_size" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    q "VACUUM cachekit_queue" >/dev/null
}

# ---- 5: idle worker ------------------------------------------------------------------

# the worker's CPU (ms), wake-ups and deliveries over one window -> results <prefix>_*
idle_window() {    # pid prefix
    local pid=$1 p=$2 c0 c1 w0 w1 d0 d1
    d0=$(worker_counter entries_delivered)
    c0=$(proc_cpu_ns "$pid")
    w0=$(proc_switches "$pid")
    sleep "$IDLE_SECONDS"
    c1=$(proc_cpu_ns "$pid")
    w1=$(proc_switches "$pid")
    d1=$(worker_counter entries_delivered)
    res_add "${p}_cpu_ms" "$(calc "($c1 - $c0) / 1e6")"
    res_add "${p}_wakeups" "$((w1 - w0))"
    res_add "${p}_deliveries" "$((d1 - d0))"
    say "    $(fmt 2 "$(res_last "${p}_cpu_ms")") ms CPU, $((w1 - w0)) wake-ups"
}

idle_part() {
    local pid
    set_trigger none
    [[ $(q "SELECT cachekit_wait('10 minutes')") == t ]] || warn "queue not empty before the idle test"
    pid=$(q "SELECT worker_pid FROM cachekit_stats")
    [[ -n $pid && -r /proc/$pid/stat ]] || { warn "no worker process to watch"; return 1; }
    sleep 1
    # first right after the previous scenario's work: the worker's one
    # clean-up (a vacuum giving back the queue's emptied pages) falls here;
    # then the steady idle that the target is about
    say "idle: watching the worker (pid $pid) for $IDLE_SECONDS s after work, then $IDLE_SECONDS s more"
    idle_window "$pid" idle_after
    idle_window "$pid" idle
}

# ---- 6: sustained load --------------------------------------------------------------
# mean TPS of pgbench's -P intervals in the first and in the last
# SUSTAIN_WINDOW seconds of a run (pgbench may or may not print the interval
# that ends with the run)
window_means() {    # pgbench-log -> "first last"
    awk -v w="$SUSTAIN_WINDOW" '/^progress:/ { t[++n] = $2; v[n] = $4 }
        END {
            for (i = 1; i <= n; i++) {
                if (t[i] <= w + 0.5) { f += v[i]; fn++ }
                if (t[i] > t[n] - w + 0.5) { l += v[i]; ln++ }
            }
            if (fn && ln) printf "%.1f %.1f\n", f / fn, l / ln
        }' "$1"
}

# the same sustained run without any trigger: how much the machine alone
# moves between the first and the last minute
sustain_reference() {
    local log=$WORK/logs/sustain-reference.log first last
    prepare_run
    say "sustained load without trigger (reference): warm-up ${SUSTAIN_WARMUP}s, then ${SUSTAIN_SECONDS}s"
    run_pgbench "$WORK/logs/sustain-reference-warmup.log" -T "$SUSTAIN_WARMUP" -f "$WORK/update.sql"
    run_pgbench "$log" -T "$SUSTAIN_SECONDS" -P "$SUSTAIN_PROGRESS" -f "$WORK/update.sql"
    read -r first last < <(window_means "$log")
    res_add sustain_ref_first "$first"
    res_add sustain_ref_last "$last"
}

sustain_part() {
    local log=$WORK/logs/sustain.log samples=$WORK/queue_samples sampler size0 sizew size1 rows1 first last n
    prepare_run
    set_trigger "${SUSTAIN_TRIGGER:-ck_row}"
    size0=$(q "SELECT pg_total_relation_size('cachekit_queue')")
    # the same load first, unmeasured: the first measured interval should not
    # be the one that fills caches and grows the queue to its working size
    say "sustained load: warm-up ${SUSTAIN_WARMUP}s (not measured)"
    run_pgbench "$WORK/logs/sustain-warmup.log" -T "$SUSTAIN_WARMUP" -f "$WORK/update.sql"
    sizew=$(q "SELECT pg_total_relation_size('cachekit_queue')")
    sampler=$(helper_start queue_sampler "$WORK/logs/sampler.log" bash -c '
        while :; do
            '"$PG_BIN"'/psql -X -qAt -c "SELECT pg_total_relation_size('\''cachekit_queue'\''), (SELECT count(*) FROM cachekit_queue), to_char(clock_timestamp(), '\''HH24:MI:SS'\''), entries_delivered, failed_attempts, last_error FROM cachekit_worker_state()" >>"$0" 2>/dev/null
            sleep "$1"
        done' "$samples" "$(((SUSTAIN_WINDOW + 5) / 6))")
    say "sustained load: ${SUSTAIN_SECONDS}s, progress every ${SUSTAIN_PROGRESS}s"
    run_pgbench "$log" -T "$SUSTAIN_SECONDS" -P "$SUSTAIN_PROGRESS" -f "$WORK/update.sql"
    size1=$(q "SELECT pg_total_relation_size('cachekit_queue')")
    rows1=$(q "SELECT count(*) FROM cachekit_queue")
    helper_stop "$sampler"
    grep '^progress:' "$log" | sed 's/^/    /' >&2 || true
    read -r first last < <(window_means "$log")
    res_add sustain_first "$first"
    res_add sustain_last "$last"
    res_add sustain_tps "$(pgbench_tps "$log")"
    res_add sustain_size0 "$size0"
    res_add sustain_sizew "$sizew"
    res_add sustain_size1 "$size1"
    res_add sustain_rows1 "$rows1"
    res_add sustain_sizemax "$(cut -d'|' -f1 "$samples" 2>/dev/null | sort -n | tail -n 1)"
    res_add sustain_rowsmax "$(cut -d'|' -f2 "$samples" 2>/dev/null | sort -n | tail -n 1)"
    # growth: the largest size seen in the second half of the run against
    # the largest in the first half
    n=$(wc -l <"$samples")
    res_add sustain_max_half1 "$(head -n "$((n / 2))" "$samples" | cut -d'|' -f1 | sort -n | tail -n 1)"
    res_add sustain_max_half2 "$(tail -n "$((n - n / 2))" "$samples" | cut -d'|' -f1 | sort -n | tail -n 1)"
    [[ $(q "SELECT cachekit_wait('10 minutes')") == t ]] || warn "queue not drained after the sustained run"
    set_trigger none
}

# ---- run the parts ----------------------------------------------------------------------
# Each part runs in a subshell with errexit: a failure makes its figures
# n/a and the next part runs; helpers it left are stopped.
run_part() {
    local name=$1 rc
    wants "$name" || return 0
    say "===== $name"
    set +e
    ("part_$name")
    rc=$?
    set -e
    if ((rc != 0)); then
        warn "$name failed (exit $rc): its figures are n/a"
        res_add "failed.$name" "$rc"
    fi
    helpers_stop_all
    set_trigger none 2>/dev/null || true
}
part_tps() { set -e; tps_part; }
part_bulk() { set -e; bulk_part; }
part_latency() { set -e; latency_part; }
part_drain() { set -e; drain_part; }
part_idle() { set -e; idle_part; }
part_sustain() { set -e; sustain_part; if ((SUSTAIN_REFERENCE)); then sustain_reference; fi; }

: >"$WORK/results"
for part in tps bulk latency drain idle sustain; do run_part "$part"; done

# ---- report -----------------------------------------------------------------------------
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo '?'; }

report() {
    local W='%-46s %12s %7s %10s %-7s %s\n' base v r
    row() { printf "$W" "$@"; }
    section() { printf '\n%s\n' "$*"; }

    echo "cachekit benchmark -- $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(( ($(date +%s) - START_EPOCH) / 60 )) min"
    echo "machine:    $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -r)"
    echo "load avg:   $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (other processes make figures noisy)"
    echo "versions:   $("$PG_BIN/postgres" --version | sed 's/^postgres //'), Redis $(rcli --raw INFO server | tr -d '\r' | sed -n 's/^redis_version://p'), hiredis $(pkg_version libhiredis0.14), cachekit $git_rev"
    echo "            node $(node --version 2>/dev/null || echo -), pg $( ((NODE_OK)) && node -p "require('$NODE_DIR/node_modules/pg/package.json').version" || echo -), ioredis $( ((NODE_OK)) && node -p "require('$NODE_DIR/node_modules/ioredis/package.json').version" || echo -), pgmemcache $( ((MC_OK)) && pkg_version postgresql-15-pgmemcache || echo -), memcached ${MC_VERSION:--}"
    echo "postgres:   synchronous_commit=off shared_buffers=1GB max_wal_size=4GB checkpoint_timeout=30min; cachekit.batch_size=1000 unless said"
    echo "workload:   pgbench -M $BENCH_PROTOCOL -c $BENCH_CLIENTS -j $BENCH_CLIENTS, UPDATE users SET name = name || '', updated_at = now() WHERE id = random(1, $BENCH_ROWS)"
    echo "            ${BENCH_SECONDS}s per run, $BENCH_ROUNDS interleaved rounds, medians; Redis holds user:0..user:$BENCH_ROWS at each run's start"
    if [[ -s $WORK/results ]] && grep -q '^failed\.' "$WORK/results"; then
        echo "FAILED PARTS: $(grep '^failed\.' "$WORK/results" | sed 's/^failed\.//; s/ / (exit /; s/$/)/' | paste -sd, -)"
    fi
    echo
    row scenario figure ratio target verdict notes
    row "--------" "------" "-----" "------" "-------" "-----"

    if wants tps; then
        section "1/7. single-row UPDATE throughput (TPS, median of $BENCH_ROUNDS)"
        base=$(res_median tps.none)
        row "no trigger (TPS)" "$(fmt 0 "$base")" "$( [[ -n $base ]] && echo 1.00 || echo n/a)" "" "" "rounds $(res_list tps.none)"
        tps_row() {    # scenario label target-op target
            local s=$1 label=$2 v r note
            v=$(res_median "tps.$s")
            r=$(ratio "$v" "$base")
            note="rounds $(res_list "tps.$s")"
            case $s in
                ck_* | write_through) note="$note; CPU % of a core: worker $(fmt 0 "$(res_median "cpu_async.$s")"), redis $(fmt 0 "$(res_median "cpu_redis.$s")")" ;;
                outbox) note="$note; CPU % of a core: drainer $(fmt 0 "$(res_median "cpu_async.$s")"), redis $(fmt 0 "$(res_median "cpu_redis.$s")")" ;;
                notify) note="$note; CPU % of a core: listener $(fmt 0 "$(res_median "cpu_async.$s")"), redis $(fmt 0 "$(res_median "cpu_redis.$s")")" ;;
                memcache) note="$note; CPU % of a core: memcached $(fmt 0 "$(res_median "cpu_async.$s")")" ;;
            esac
            case $s in
                ck_* | write_through | outbox | notify)
                    note="$note; backlog at end $(res_list "backlog.$s"), delivered $(res_list "catchup.$s") ms later"
                    # more than a second of work left over: the figure
                    # counts work that was not done yet
                    if awk -v b="$(res_median "backlog.$s")" -v t="$v" 'BEGIN { exit !(b > t) }'; then
                        note="$note; !! delivery fell behind, TPS flattered"
                    fi
                    ;;
                memcache)
                    note="$note; memcached saw $(res_list mc_deletes) deletes" ;;
            esac
            if [[ -n ${3:-} ]]; then
                row "$label" "$(fmt 0 "$v")" "$(fmt 2 "$r")" "$3$4" "$(verdict "$r" "$3" "$4")" "$note"
            else
                row "$label" "$(fmt 0 "$v")" "$(fmt 2 "$r")" "" "" "$note"
            fi
        }
        tps_row ck_row "cachekit row trigger (TPS)" ">=" 0.80
        tps_row ck_row_redelete "  + redelete_after ${BENCH_REDELETE_AFTER:-500ms} (TPS)"
        # its cost: the median of per-round ratios to the row trigger of the same round
        r=$(round_ratios tps.ck_row_redelete tps.ck_row)
        row "  redelete_after vs row trigger, per round" "" "$(fmt 3 "${r%% *}")" ">=0.98" "$(verdict "${r%% *}" ">=" 0.98)" \
            "median of per-round ratios; min-max $(min_max "$r")"
        tps_row outbox "  alt a: PL/pgSQL outbox + drainer (TPS)"
        if ((NODE_OK)); then tps_row notify "  alt b: pg_notify + Node listener (TPS)"
        else row "  alt b: pg_notify + Node listener (TPS)" n/a n/a "" "" "npm install failed or skipped"; fi
        if ((MC_OK)); then tps_row memcache "  alt c: pgmemcache sync delete (TPS)"
        else row "  alt c: pgmemcache sync delete (TPS)" n/a n/a "" "" "pgmemcache/memcached not available"; fi
        tps_row write_through "cachekit write-through (TPS)" ">=" 0.80

        section "1b. issue 15: per-round ratios to no trigger in the same round (median, min-max, every round)"
        round_row() {    # scenario base label op target [every-round-min]
            local s=$1 b=$2 label=$3 rs m
            rs=$(paste -d' ' <(res_all "tps.$s") <(res_all "tps.$b") | awk 'NF == 2 && $2 > 0 { printf "%.3f\n", $1 / $2 }')
            m=$(round_ratios "tps.$s" "tps.$b")
            local verd=n/a note
            if [[ -n $m && -n ${5:-} ]]; then
                verd=$(verdict "${m%% *}" "$4" "$5")
                if [[ -n ${6:-} && $verd == PASS ]]; then verd=$(verdict "$(echo "$m" | cut -d' ' -f2)" ">=" "$6"); fi
            fi
            note="min-max $(min_max "$m"); rounds $(echo "$rs" | awk 'NF' | paste -sd/ -)"
            note="$note; TPS $(res_list "tps.$s") vs $(res_list "tps.$b")"
            # the same from CPU: server CPU per transaction, base / scenario
            local cr
            cr=$(paste -d' ' <(res_all "cpu_txn.$s") <(res_all "cpu_txn.$b") | awk 'NF == 2 && $1 > 0 { printf "%.3f\n", $2 / $1 }' | paste -sd/ -)
            note="$note; server CPU us/txn $(res_list "cpu_txn.$s" 1) vs $(res_list "cpu_txn.$b" 1), CPU ratio per round $cr"
            case $s in ck_* | write_through)
                note="$note; per 10k rows: worker $(fmt 0 "$(res_median "cpu10k_worker.$s")") ms, redis $(fmt 0 "$(res_median "cpu10k_redis.$s")") ms CPU, $(fmt 2 "$(res_median "entries.$s")") entries/row" ;;
            esac
            row "$label" "" "$(fmt 3 "${m%% *}")" "${5:+$4$5}${6:+ (each>=$6)}" "$verd" "$note"
        }
        round_row ck_row none "1. key+tag row trigger, $BENCH_CLIENTS clients" ">=" 0.85 0.80
        round_row ck_row_c16 none_c16 "2. key+tag row trigger, -c $BENCH_MANY_CLIENTS -j 2" ">=" 0.80
        round_row write_through none "3. write-through row trigger, $BENCH_CLIENTS clients" ">=" 0.80
        round_row ck_row_tx10 none_tx10 "4. key+tag row trigger, 10 UPDATEs/transaction" ">=" 0.80
        round_row ck_null none "5. ref: trigger fires, renders NULL, no entry"
    fi

    if wants bulk; then
        # ratios: the median of per-round ratios to the no-trigger UPDATE of the same round
        section "2. one UPDATE of all $BENCH_ROWS rows (ms, median of $BULK_RUNS; ratio: median of per-round ratios)"
        base=$(res_median bulk.none)
        row "no trigger: UPDATE (ms)" "$(fmt 0 "$base")" "$( [[ -n $base ]] && echo 1.00 || echo n/a)" "" "" "runs $(res_list bulk.none)"
        for v in noop_stmt ck_stmt ck_row; do
            local label target=
            case $v in
                noop_stmt) label="  ref: empty trigger, same transition tables (ms)" ;;
                ck_stmt) label="cachekit statement trigger: UPDATE (ms)" target="<=" ;;
                *) label="cachekit row trigger: UPDATE (ms)" ;;
            esac
            r=$(round_ratios "bulk.$v" bulk.none)
            if [[ $v == noop_stmt ]]; then
                row "$label" "$(fmt 0 "$(res_median "bulk.$v")")" "$(fmt 2 "${r%% *}")" "" "" \
                    "PostgreSQL's own capture of OLD and NEW TABLE; min-max $(min_max "$r"); runs $(res_list "bulk.$v")"
                continue
            fi
            if [[ -z $(res_median "bulk.$v") ]]; then
                row "$label" n/a n/a "${target:+<=1.30}" n/a "$(res_last "bulk_err.$v")"
                continue
            fi
            local done_r
            done_r=$(round_ratios "bulk_done.$v" bulk.none)
            row "$label" "$(fmt 0 "$(res_median "bulk.$v")")" "$(fmt 2 "${r%% *}")" "${target:+<=1.30}" \
                "$( [[ -n $target ]] && verdict "${r%% *}" "<=" 1.30)" \
                "min-max $(min_max "$r"); until cachekit_wait returns: $(fmt 0 "$(res_median "bulk_done.$v")") ms (x$(fmt 2 "${done_r%% *}")); $(res_last "bulk_entries.$v") queue entries, $(res_last "bulk_left.$v") cached rows left; runs $(res_list "bulk.$v")"
        done
        r=$(round_ratios bulk.ck_stmt bulk.noop_stmt)
        row "  statement trigger vs empty trigger, per round" "" "$(fmt 2 "${r%% *}")" "" "" \
            "cachekit's own part beside PostgreSQL's capture; min-max $(min_max "$r")"
    fi

    if wants latency; then
        section "3. COMMIT returned -> del seen on Redis keyspace channel ($LAT_SAMPLES samples, background $LAT_RATE updates/s)"
        if [[ -n $(res_last lat.p50_ms) ]]; then
            local note
            note="$(res_last lat.samples) samples, $(res_last lat.timeouts) timeouts (2 s), $(res_last lat.early) seen before COMMIT returned"
            row "p50 (ms)" "$(fmt 3 "$(res_last lat.p50_ms)")" "" "<=0.1" "$(verdict "$(res_last lat.p50_ms)" "<=" 0.1)" "$note"
            row "p99 (ms)" "$(fmt 3 "$(res_last lat.p99_ms)")" "" "<=1" "$(verdict "$(res_last lat.p99_ms)" "<=" 1)" "p90 $(res_last lat.p90_ms), max $(res_last lat.max_ms), min $(res_last lat.min_ms); UPDATE sent -> gone p50 $(res_last lat.e2e_p50_ms) p99 $(res_last lat.e2e_p99_ms)"
        else
            row "p50 (ms)" n/a "" "<=0.1" n/a "latency test did not run"
            row "p99 (ms)" n/a "" "<=1" n/a ""
        fi
    fi

    if wants drain; then
        section "4. drain of a $DRAIN_ENTRIES-entry backlog (keys/s, median of $DRAIN_ROUNDS; end seen by $DRAIN_WAIT)"
        for b in 1000 10000; do
            v=$(res_median "drain.$b")
            # issue 15's target (>= 600k keys/s) is for the default batch size
            local drain_target="" verdict_text="" aside="; for comparison"
            if ((b == 1000)); then
                drain_target=">=600000" verdict_text=$(verdict "$v" ">=" 600000) aside=""
            fi
            row "batch_size $b (keys/s)" "$(fmt 0 "$v")" "" "$drain_target" "$verdict_text" \
                "drain $(res_list "drain_ms.$b") ms; keys left in Redis $(res_list "drain_left.$b")$aside"
        done
        row "  (backlog built by INSERT into the queue, entries/s)" "$(fmt 0 "$(calc "$DRAIN_ENTRIES / ($(res_median drain_enqueue_ms) / 1000)" 2>/dev/null)")" "" "" "" "one statement, $(res_list drain_enqueue_ms) ms"
    fi

    if wants idle; then
        section "5. idle worker (two windows of $IDLE_SECONDS s without writes)"
        v=$(res_last idle_after_cpu_ms)
        row "  first window, right after work (ms CPU)" "$(fmt 2 "$v")" "" "" "" \
            "$(res_last idle_after_wakeups) wake-ups, $(res_last idle_after_deliveries) deliveries; includes the one vacuum that gives back the queue's emptied pages"
        v=$(res_last idle_cpu_ms)
        row "worker CPU (ms per ${IDLE_SECONDS} s)" "$(fmt 2 "$v")" "" "~0 (<=10)" "$(verdict "$v" "<=" 10)" \
            "$(res_last idle_wakeups) wake-ups (voluntary context switches), $(res_last idle_deliveries) deliveries"
    fi

    if wants sustain; then
        section "6. sustained load, trigger ${SUSTAIN_TRIGGER:-ck_row} (${SUSTAIN_SECONDS}s after ${SUSTAIN_WARMUP}s warm-up; first vs last ${SUSTAIN_WINDOW}s, pgbench -P $SUSTAIN_PROGRESS)"
        v=$(res_last sustain_first)
        r=$(ratio "$(res_last sustain_last)" "$v")
        row "first ${SUSTAIN_WINDOW}s (TPS)" "$(fmt 0 "$v")" "" "" "" "whole run $(fmt 0 "$(res_last sustain_tps)") TPS"
        row "last ${SUSTAIN_WINDOW}s (TPS)" "$(fmt 0 "$(res_last sustain_last)")" "$(fmt 2 "$r")" "0.90-1.10" "$(verdict "$r" in 0.90 1.10)" ""
        if [[ -n $(res_last sustain_ref_first) ]]; then
            row "  ref: no trigger, last / first ${SUSTAIN_WINDOW}s" "$(fmt 0 "$(res_last sustain_ref_last)")" \
                "$(fmt 2 "$(ratio "$(res_last sustain_ref_last)" "$(res_last sustain_ref_first)")")" "" "" \
                "the same run without trigger, after it: first ${SUSTAIN_WINDOW}s $(fmt 0 "$(res_last sustain_ref_first)") TPS (how much this machine moves on its own)"
        fi
        row "cachekit_queue size start -> end (kB)" "$(fmt 0 "$(calc "$(res_last sustain_size0) / 1024" 2>/dev/null)") -> $(fmt 0 "$(calc "$(res_last sustain_size1) / 1024" 2>/dev/null)")" \
            "" "" "" "after warm-up $(fmt 0 "$(calc "$(res_last sustain_sizew) / 1024" 2>/dev/null)") kB; largest seen $(fmt 0 "$(calc "$(res_last sustain_sizemax) / 1024" 2>/dev/null)") kB; rows at end $(res_last sustain_rows1), most seen $(res_last sustain_rowsmax)"
        v=$(res_last sustain_max_half1)
        r=$(ratio "$(res_last sustain_max_half2)" "$v")
        row "queue size, largest 2nd half / 1st half" "$(fmt 2 "$r")" "" "<=1.10" "$(verdict "$r" "<=" 1.10)" \
            "$(fmt 0 "$(calc "$v / 1024" 2>/dev/null)") kB -> $(fmt 0 "$(calc "$(res_last sustain_max_half2) / 1024" 2>/dev/null)") kB (table, toast and indexes)"
    fi
}

report >"$WORK/report.txt" 2>"$WORK/logs/report.err" || { cat "$WORK/logs/report.err" >&2; die "could not write the report"; }
cp "$WORK/report.txt" "$BENCH_DIR/last-run.txt"
printf '\n'
cat "$WORK/report.txt"
printf '\n(written to %s)\n' "$BENCH_DIR/last-run.txt"
exit 0
}
