#!/usr/bin/env bash
# bench/tls.sh -- cachekit over TLS against plain TCP, side by side, as root.
#
#   bash bench/tls.sh                 full run (about 10-15 minutes)
#   QUICK=1 bash bench/tls.sh         smoke run (about 3 minutes)
#
# One redis-server listens on a plain and on a TLS port (certificates made
# here with openssl), so both transports reach the very same server. In
# each of TLS_ROUNDS interleaved rounds (plain first in odd rounds, TLS
# first in even ones) it measures, for each transport:
#   drain    a backlog of DRAIN_ENTRIES one-key entries (INSERT) built while
#            the worker points at a dead port, then the time until it is
#            delivered (keys/s)
#   latency  COMMIT -> key gone, LAT_SAMPLES samples (bench/latency.c:
#            keyspace notification of the deletion)
#   tps      pgbench TPS of single-row UPDATEs with the row trigger,
#            divided by the TPS of the same run without trigger
# and prints the median of the per-round TLS/plain ratios with their
# min-max. Output also goes to bench/tls-last-run.txt.
#
# Environment: TLS_PARTS [drain latency tps], TLS_ROUNDS [3], DRAIN_ENTRIES [1000000 / 100000],
# LAT_SAMPLES [1000 / 200], TPS_SECONDS [10 / 3], BENCH_ROWS [100000],
# BENCH_CLIENTS [2], CACHEKIT_PG_BIN, BENCH_SKIP_BUILD=1 (use the installed
# cachekit), BENCH_BUILD_DIR [/tmp/cachekit-bench-build], BENCH_KEEP=1.
{
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA PGHOSTADDR

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then d_drain=100000 d_lat=200 d_tps=3; else d_drain=1000000 d_lat=1000 d_tps=10; fi
TLS_ROUNDS=${TLS_ROUNDS:-3}
DRAIN_ENTRIES=${DRAIN_ENTRIES:-$d_drain}
LAT_SAMPLES=${LAT_SAMPLES:-$d_lat}
TPS_SECONDS=${TPS_SECONDS:-$d_tps}
BENCH_ROWS=${BENCH_ROWS:-100000}
BENCH_CLIENTS=${BENCH_CLIENTS:-2}

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
bench_init tls
latency_probe_build

# ---- servers ------------------------------------------------------------------------
REDIS_PID= 
cleanup() {
    set +e
    [[ -z ${PG_DATA:-} || ! -f $PG_DATA/postmaster.pid ]] ||
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
    [[ -z $REDIS_PID ]] || { kill "$REDIS_PID"; wait "$REDIS_PID"; } 2>/dev/null
    [[ ${BENCH_KEEP:-0} == 1 ]] && say "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

say "certificates (openssl)"
(
    cd "$WORK"
    key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${key[@]}" -keyout ca.key -out ca.crt -days 2 -subj "/CN=bench CA" 2>/dev/null
    openssl req "${key[@]}" -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.crt -days 2 -extfile server.ext 2>/dev/null
    chmod 0644 server.key ca.crt server.crt
)

REDIS_PORT=$(free_port 63890)
TLS_PORT=$(free_port $((REDIS_PORT + 1)))
PG_PORT=$(free_port 55532)
say "redis-server on 127.0.0.1:$REDIS_PORT (plain) and :$TLS_PORT (TLS)"
redis-server --port "$REDIS_PORT" --tls-port "$TLS_PORT" --bind 127.0.0.1 --protected-mode no \
    --tls-cert-file "$WORK/server.crt" --tls-key-file "$WORK/server.key" \
    --tls-ca-cert-file "$WORK/ca.crt" --tls-auth-clients no \
    --save '' --appendonly no --daemonize no --dir "$WORK" --enable-debug-command local \
    --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for ((n = 0; n < 200; n++)); do [[ $(rcli PING 2>/dev/null) == PONG ]] && break; sleep 0.05; done
[[ $(rcli PING 2>/dev/null) == PONG ]] || die "redis-server did not start"

PLAIN_URL="redis://127.0.0.1:$REDIS_PORT/0"
TLS_URL="rediss://127.0.0.1:$TLS_PORT/0"
bench_pg_start "$PG_PORT" "$PLAIN_URL" <<EOF
cachekit.redis_tls_ca_file = '$WORK/ca.crt'
EOF
printf '\\set id random(1, %d)\nUPDATE users SET name = name, updated_at = now() WHERE id = :id;\n' \
    $((BENCH_ROWS - 1000)) >"$WORK/update.sql"
chmod 0644 "$WORK/update.sql"

RESULTS=$WORK/results

drain() {    # name url
    local ms
    rcli FLUSHALL >/dev/null
    drain_backlog rcli DEBUG POPULATE "$DRAIN_ENTRIES" k
    ms=$(drain_time "$2")
    [[ $(rcli DBSIZE) == 0 ]] || say "    !!! keys left in Redis after the drain over $1"
    res "drain.$1" "$(calc "$DRAIN_ENTRIES / ($ms / 1000)")"
    say "    drain over $1: $(calc "$DRAIN_ENTRIES / ($ms / 1000)") keys/s ($ms ms)"
}

latency() {    # name url
    local out=$WORK/latency.$1.out
    use_url "$2"
    set_trigger on
    runuser -u postgres -- env PGHOST="$WORK" PGPORT="$PG_PORT" PGUSER=postgres PGDATABASE=postgres \
        REDIS_PORT="$REDIS_PORT" SAMPLES="$LAT_SAMPLES" ID_FIRST=$((BENCH_ROWS - 999)) ID_LAST="$BENCH_ROWS" \
        "$WORK/latency" >"$out" 2>&1 || { cat "$out" >&2; die "the latency probe failed"; }
    res "p50.$1" "$(sed -n 's/^p50_ms=//p' "$out")"
    res "p99.$1" "$(sed -n 's/^p99_ms=//p' "$out")"
    say "    COMMIT -> key gone over $1: p50 $(sed -n 's/^p50_ms=//p' "$out") ms, p99 $(sed -n 's/^p99_ms=//p' "$out") ms"
    set_trigger off
}

tps_one() {    # -> tps
    q "CHECKPOINT" >/dev/null
    runuser -u postgres -- "$PG_BIN/pgbench" -h "$WORK" -p "$PG_PORT" -U postgres -n -M prepared \
        -c "$BENCH_CLIENTS" -j "$BENCH_CLIENTS" -T "$TPS_SECONDS" -f "$WORK/update.sql" postgres 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1
}

tps() {    # name url
    local none trig
    use_url "$2"
    set_trigger off
    none=$(tps_one)
    set_trigger on
    trig=$(tps_one)
    set_trigger off
    q "SELECT cachekit_wait('10 minutes')" >/dev/null
    res "tps_ratio.$1" "$(calc "$trig / $none")"
    say "    TPS over $1: $trig with the row trigger, $none without (ratio $(calc "$trig / $none"))"
}

for ((r = 1; r <= TLS_ROUNDS; r++)); do
    if ((r % 2)); then order=(plain tls); else order=(tls plain); fi
    say "round $r of $TLS_ROUNDS (${order[*]})"
    for part in ${TLS_PARTS:-drain latency tps}; do
        for t in "${order[@]}"; do
            [[ $t == plain ]] && url=$PLAIN_URL || url=$TLS_URL
            "$part" "$t" "$url"
        done
        # the per-round ratio, TLS over plain
        case $part in
            drain) a=$(grep "^drain.tls " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
                   b=$(grep "^drain.plain " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
                   res ratio.drain "$(calc "$a / $b")" ;;
            tps)   a=$(grep "^tps_ratio.tls " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
                   b=$(grep "^tps_ratio.plain " "$RESULTS" | tail -n 1 | cut -d' ' -f2)
                   res ratio.tps "$(calc "$a / $b")" ;;
        esac
    done
done

{
    echo "cachekit over TLS vs plain TCP, $(date -u '+%Y-%m-%d %H:%M UTC'), $TLS_ROUNDS interleaved rounds"
    echo "machine: $(nproc) cores, load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "median (min-max) of the per-round values"
    echo
    printf '%-44s %-26s %-26s %s\n' "figure" "plain TCP" "TLS" "TLS / plain"
    printf '%-44s %-26s %-26s %s\n' "backlog drain, $DRAIN_ENTRIES entries, keys/s" \
        "$(summary drain.plain 0)" "$(summary drain.tls 0)" "$(summary ratio.drain 2) (target >= 0.5)"
    printf '%-44s %-26s %-26s %s\n' "COMMIT -> key gone p50, ms" "$(summary p50.plain 3)" "$(summary p50.tls 3)" ""
    printf '%-44s %-26s %-26s %s\n' "COMMIT -> key gone p99, ms" "$(summary p99.plain 3)" "$(summary p99.tls 3)" "(target TLS <= 2 ms)"
    printf '%-44s %-26s %-26s %s\n' "row-trigger TPS / no-trigger TPS" \
        "$(summary tps_ratio.plain 3)" "$(summary tps_ratio.tls 3)" "$(summary ratio.tps 3) (target: 1 within noise)"
} | tee "$BENCH_DIR/tls-last-run.txt"
}
