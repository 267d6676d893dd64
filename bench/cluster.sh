#!/usr/bin/env bash
# bench/cluster.sh -- cachekit against a 3-primary Redis Cluster beside a
# single Redis node, side by side, as root.
#
#   bash bench/cluster.sh                 full run (1M-entry drains; about 5-10 minutes)
#   QUICK=1 bash bench/cluster.sh         smoke run (about 3 minutes)
#
# One single redis-server, and a cluster of CLUSTER_PRIMARIES primaries (no
# replicas: cachekit WAITs for replicas after each batch, which this does
# not measure) made by redis-cli --cluster create, all on loopback. In each
# of CLUSTER_ROUNDS interleaved rounds (single first in odd rounds, cluster
# first in even ones) it measures, for each:
#   drain    a backlog of DRAIN_ENTRIES cachekit_delete entries built while
#            the worker points at a dead port (the keys exist in Redis),
#            then the time until it is delivered (keys/s)
#   latency  COMMIT -> key gone, LAT_SAMPLES samples (bench/latency.c:
#            keyspace notification of the deletion, heard on every primary)
# and prints the median of the per-round cluster/single ratios with their
# min-max. Output also goes to bench/cluster-last-run.txt.
#
# Environment: CLUSTER_PARTS [drain latency], CLUSTER_ROUNDS [3],
# CLUSTER_PRIMARIES [3], DRAIN_ENTRIES [1000000 / 100000], LAT_SAMPLES
# [1000 / 200], BENCH_ROWS [100000], CACHEKIT_PG_BIN, BENCH_SKIP_BUILD=1 (use
# the installed cachekit), BENCH_BUILD_DIR [/tmp/cachekit-bench-build],
# BENCH_KEEP=1.
{
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
NODE_DIR=$BENCH_DIR/node
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then d_drain=100000 d_lat=200; else d_drain=1000000 d_lat=1000; fi
CLUSTER_ROUNDS=${CLUSTER_ROUNDS:-3}
CLUSTER_PRIMARIES=${CLUSTER_PRIMARIES:-3}
DRAIN_ENTRIES=${DRAIN_ENTRIES:-$d_drain}
LAT_SAMPLES=${LAT_SAMPLES:-$d_lat}
BENCH_ROWS=${BENCH_ROWS:-100000}

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
bench_init cluster
latency_probe_build

# ---- Redis: one node, and a cluster ----------------------------------------------------
REDIS_PIDS=()
cleanup() {
    set +e
    [[ -z ${PG_DATA:-} || ! -f $PG_DATA/postmaster.pid ]] ||
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
    for pid in "${REDIS_PIDS[@]}"; do { kill "$pid"; wait "$pid"; } 2>/dev/null; done
    [[ ${BENCH_KEEP:-0} == 1 ]] && say "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

start_redis() {    # port [args...]
    local port=$1
    shift
    mkdir -p "$WORK/redis-$port"
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no --save '' --appendonly no \
        --daemonize no --dir "$WORK/redis-$port" --logfile "$WORK/redis-$port/redis.log" \
        --enable-debug-command local "$@" </dev/null >/dev/null 2>&1 &
    REDIS_PIDS+=($!)
    for ((n = 0; n < 200; n++)); do
        [[ $(redis-cli -p "$port" PING 2>/dev/null) == PONG ]] && return 0
        sleep 0.05
    done
    die "redis-server on port $port did not start"
}

SINGLE_PORT=$(free_port 43790)
start_redis "$SINGLE_PORT"
CLUSTER_PORTS=()
p=$((SINGLE_PORT + 1))
for ((i = 0; i < CLUSTER_PRIMARIES; i++)); do
    p=$(free_port "$p")
    start_redis "$p" --cluster-enabled yes
    CLUSTER_PORTS+=("$p")
    p=$((p + 1))
done
say "single redis-server on :$SINGLE_PORT, cluster on :${CLUSTER_PORTS[*]}"
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-replicas 0 \
    --cluster-yes >"$WORK/cluster-create.log" 2>&1 || die "redis-cli --cluster create failed"
for ((n = 0; n < 600; n++)); do
    ok=1
    for port in "${CLUSTER_PORTS[@]}"; do
        redis-cli -p "$port" CLUSTER INFO | grep -q 'cluster_state:ok' || ok=0
    done
    ((ok)) && break
    sleep 0.1
done
((ok)) || die "the cluster did not reach cluster_state:ok"
CLUSTER_PORT_LIST=$(IFS=,; echo "${CLUSTER_PORTS[*]}")

# ---- PostgreSQL ---------------------------------------------------------------------------
SINGLE_URL="redis://127.0.0.1:$SINGLE_PORT/0"
CLUSTER_URL="redis://$(printf '127.0.0.1:%s,' "${CLUSTER_PORTS[@]}" | sed 's/,$//')/"
bench_pg_start "$(free_port 55632)" "$SINGLE_URL" </dev/null

redis_ports() {    # single|cluster -> the ports of its primaries
    [[ $1 == single ]] && echo "$SINGLE_PORT" || echo "${CLUSTER_PORTS[*]}"
}
dbsize() {    # single|cluster -> keys over its primaries
    local n=0
    for port in $(redis_ports "$1"); do n=$((n + $(redis-cli -p "$port" DBSIZE))); done
    echo "$n"
}

RESULTS=$WORK/results

populate() {    # single|cluster: the backlog's keys, each on its slot's primary
    if [[ $1 == single ]]; then
        redis-cli -p "$SINGLE_PORT" DEBUG POPULATE "$DRAIN_ENTRIES" k >/dev/null
    else
        REDIS_CLUSTER_PORTS=$CLUSTER_PORT_LIST COUNT=$DRAIN_ENTRIES PREFIX=k: \
            node "$NODE_DIR/populate_cluster.js" || die "populate_cluster.js failed"
    fi
    [[ $(dbsize "$1") == "$DRAIN_ENTRIES" ]] || die "populating $1 made $(dbsize "$1") keys"
}

drain() {    # name url
    local ms
    for port in $(redis_ports "$1"); do redis-cli -p "$port" FLUSHALL >/dev/null; done
    drain_backlog populate "$1"
    ms=$(drain_time "$2")
    [[ $(dbsize "$1") == 0 ]] || say "    !!! $(dbsize "$1") keys left in Redis after the drain over $1"
    res "drain.$1" "$(calc "$DRAIN_ENTRIES / ($ms / 1000)")"
    say "    drain over $1: $(calc "$DRAIN_ENTRIES / ($ms / 1000)") keys/s ($ms ms)"
}

latency() {    # name url
    local out=$WORK/latency.$1.out
    local target=(REDIS_PORT="$SINGLE_PORT")
    [[ $1 == single ]] || target=(REDIS_CLUSTER_PORTS="$CLUSTER_PORT_LIST")
    use_url "$2"
    set_trigger on
    runuser -u postgres -- env PGHOST="$WORK" PGPORT="$PG_PORT" PGUSER=postgres PGDATABASE=postgres \
        "${target[@]}" SAMPLES="$LAT_SAMPLES" ID_FIRST=$((BENCH_ROWS - 999)) ID_LAST="$BENCH_ROWS" \
        "$WORK/latency" >"$out" 2>&1 || { cat "$out" >&2; die "the latency probe failed"; }
    res "p50.$1" "$(sed -n 's/^p50_ms=//p' "$out")"
    res "p99.$1" "$(sed -n 's/^p99_ms=//p' "$out")"
    say "    COMMIT -> key gone over $1: p50 $(sed -n 's/^p50_ms=//p' "$out") ms, p99 $(sed -n 's/^p99_ms=//p' "$out") ms"
    set_trigger off
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((r = 1; r <= CLUSTER_ROUNDS; r++)); do
    if ((r % 2)); then order=(single cluster); else order=(cluster single); fi
    say "round $r of $CLUSTER_ROUNDS (${order[*]}), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    for part in ${CLUSTER_PARTS:-drain latency}; do
        for t in "${order[@]}"; do
            [[ $t == single ]] && url=$SINGLE_URL || url=$CLUSTER_URL
            "$part" "$t" "$url"
        done
        # the per-round ratio, cluster over single
        a=$(grep "^${part/latency/p99}.cluster " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
        b=$(grep "^${part/latency/p99}.single " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
        res "ratio.$part" "$(calc "$a / $b")"
    done
done

{
    echo "cachekit over a $CLUSTER_PRIMARIES-primary Redis Cluster vs a single node, $(date -u '+%Y-%m-%d %H:%M UTC'), $CLUSTER_ROUNDS interleaved rounds"
    echo "machine: $(nproc) cores, load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "median (min-max) of the per-round values"
    echo
    printf '%-44s %-26s %-26s %s\n' "figure" "single node" "cluster" "cluster / single"
    printf '%-44s %-26s %-26s %s\n' "backlog drain, $DRAIN_ENTRIES entries, keys/s" \
        "$(summary drain.single 0)" "$(summary drain.cluster 0)" "$(summary ratio.drain 2) (target >= 0.5)"
    printf '%-44s %-26s %-26s %s\n' "COMMIT -> key gone p50, ms" "$(summary p50.single 3)" "$(summary p50.cluster 3)" ""
    printf '%-44s %-26s %-26s %s\n' "COMMIT -> key gone p99, ms" "$(summary p99.single 3)" "$(summary p99.cluster 3)" \
        "$(summary ratio.latency 2) (target cluster <= 5 ms)"
} | tee "$BENCH_DIR/cluster-last-run.txt"
}
