#!/usr/bin/env bash
# bench/outbox_drainer.sh -- fallback outbox drainer for bench/run.sh when
# the Node modules are not available (bench/node/outbox_drainer.js is used
# otherwise). Same job with psql and redis-cli: take up to BATCH outbox
# rows, oldest first, send DEL for their keys and tags' sets, and delete the
# rows only once redis-cli succeeded (one transaction, kept open by a psql
# coprocess). Polls every POLL_MS when the outbox is empty. Writes the
# number of rows drained to COUNT_FILE. Stops on SIGTERM.
#
# Environment: PGHOST PGPORT PGUSER PGDATABASE, REDIS_PORT, COUNT_FILE,
# TABLE (bench_outbox), BATCH (1000), POLL_MS (10), TAG_PREFIX (tag:).

set -uo pipefail
: "${REDIS_PORT:?}" "${COUNT_FILE:?}"
TABLE=${TABLE:-bench_outbox}
BATCH=${BATCH:-1000}
POLL_MS=${POLL_MS:-10}
TAG_PREFIX=${TAG_PREFIX:-tag:}
PSQL=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}/psql

drained=0
stopping=0
trap 'stopping=1' TERM INT
write_count() { echo "$drained 0" >"$COUNT_FILE.tmp" && mv -f "$COUNT_FILE.tmp" "$COUNT_FILE"; }
write_count

# one psql session for the whole run; every answer ends with a marker line
coproc PG { exec "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -F ' ' 2>&1; }
ask() {    # sql -> answer lines on stdout (without the marker)
    local line
    printf '%s\n\\echo __done__\n' "$1" >&"${PG[1]}"
    while IFS= read -r line <&"${PG[0]}"; do
        [[ $line == __done__ ]] && return 0
        [[ $line == ERROR:* ]] && { echo "outbox_drainer.sh: $line" >&2; exit 1; }
        printf '%s\n' "$line"
    done
    echo "outbox_drainer.sh: psql went away" >&2
    exit 1
}

while ((!stopping)); do
    mapfile -t rows < <(ask "BEGIN; SELECT id, key, '$TAG_PREFIX' || tag FROM $TABLE WHERE id = ANY (ARRAY(SELECT id FROM $TABLE ORDER BY id LIMIT $BATCH FOR UPDATE SKIP LOCKED));")
    if ((${#rows[@]} == 0)); then
        ask "COMMIT;" >/dev/null
        sleep "$(awk -v ms="$POLL_MS" 'BEGIN { printf "%.3f", ms / 1000 }')"
        continue
    fi
    ids=$(printf '%s\n' "${rows[@]}" | cut -d' ' -f1 | paste -sd, -)
    printf '%s\n' "${rows[@]}" | cut -d' ' -f2- | tr ' ' '\n' | sort -u | xargs -r -n 500 \
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --no-auth-warning DEL >/dev/null \
        || { ask "ROLLBACK;" >/dev/null; sleep 0.1; continue; }
    ask "DELETE FROM $TABLE WHERE id = ANY ('{$ids}'::bigint[]); COMMIT;" >/dev/null
    drained=$((drained + ${#rows[@]}))
    write_count
done
write_count
