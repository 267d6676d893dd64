#!/usr/bin/env bash
# test/demo.sh -- watch cachekit keep Redis in step with a table (the README's
# demo command). Run as root, from any directory:
#
#   bash test/demo.sh
#
# It builds and installs cachekit (test/setup.sh), starts a throwaway
# PostgreSQL 15 (port 54329, or the next free one) and a throwaway
# redis-server (port 63799, or the next free one), both in a temporary
# folder, and walks through the main job, showing Redis's keys after every
# step and checking that the right ones disappeared. Both servers are
# stopped and the folder removed on exit, also after an error or Ctrl-C.
# Exit status is 0 only if every check passed.
#
# Environment: CACHEKIT_DEMO_PG_PORT, CACHEKIT_DEMO_REDIS_PORT (first port to
# try), CACHEKIT_DEMO_KEEP=1 (keep the temporary folder, for its logs).

set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS PGDATA

WORK=
PG_DATA=
REDIS_PID=
FAILURES=0

# ---- output helpers ---------------------------------------------------------
if [[ -t 1 ]]; then
    B=$'\e[1m' DIM=$'\e[2m' GRN=$'\e[32m' RED=$'\e[31m' CYN=$'\e[36m' RST=$'\e[0m'
else
    B='' DIM='' GRN='' RED='' CYN='' RST=''
fi
step_no=0
step() {
    step_no=$((step_no + 1))
    printf '\n%s== %d. %s ==%s\n' "$B" "$step_no" "$*" "$RST"
}
explain() { printf '%s%s%s\n' "$DIM" "$*" "$RST"; }
die() { printf '%sdemo.sh: %s%s\n' "$RED" "$*" "$RST" >&2; exit 1; }

# ---- cleanup ------------------------------------------------------------------
# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$? n pid
    trap - EXIT
    # finish cleaning up even if interrupted again or stdout is gone
    trap '' INT TERM PIPE
    set +e
    if [[ -n $PG_DATA && -f $PG_DATA/postmaster.pid ]]; then
        pid=$(head -n 1 "$PG_DATA/postmaster.pid")
        echo "stopping PostgreSQL (pid $pid)"
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1
        for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null
            for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
    fi
    if [[ -n $REDIS_PID ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        echo "stopping redis-server (pid $REDIS_PID)"
        kill -TERM "$REDIS_PID" 2>/dev/null
        for ((n = 0; n < 100; n++)); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$REDIS_PID" 2>/dev/null && kill -KILL "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 && -f $WORK/postgres.log ]]; then
            printf '\n----- PostgreSQL log (last 30 lines) -----\n'
            tail -n 30 "$WORK/postgres.log"
        fi
        if [[ ${CACHEKIT_DEMO_KEEP:-0} == 1 ]]; then
            echo "kept $WORK"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 141' PIPE
trap 'echo "demo.sh: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

[[ $(id -u) -eq 0 ]] || die "must be run as root (it installs packages and starts servers as postgres)"

# ---- build and install ------------------------------------------------------
printf '%sBuilding and installing cachekit (test/setup.sh)...%s\n' "$B" "$RST"
bash "$SCRIPT_DIR/setup.sh" >/dev/null

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_in_use "$p"; do
        p=$((p + 1))
        ((p < $1 + 200)) || die "no free port near $1"
    done
    echo "$p"
}
PG_PORT=$(free_port "${CACHEKIT_DEMO_PG_PORT:-54329}")
REDIS_PORT=$(free_port "${CACHEKIT_DEMO_REDIS_PORT:-63799}")

WORK=$(mktemp -d /tmp/cachekit-demo.XXXXXX)
chown postgres:postgres "$WORK"
chmod 0755 "$WORK"
PG_DATA=$WORK/pgdata

# ---- redis-server --------------------------------------------------------------
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no \
    --save '' --appendonly no --daemonize no --dir "$WORK" \
    --logfile "$WORK/redis.log" --pidfile "$WORK/redis.pid" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!

rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --no-auth-warning "$@"; }

for ((n = 0; ; n++)); do
    kill -0 "$REDIS_PID" 2>/dev/null || { tail -n 20 "$WORK/redis.log" >&2; die "redis-server exited"; }
    # answered by our process, not by something else on the port?
    if rcli --raw INFO server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$REDIS_PID"; then
        break
    fi
    ((n < 200)) || die "redis-server did not answer within 10 seconds"
    sleep 0.05
done

# ---- PostgreSQL --------------------------------------------------------------------
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust \
    --no-locale -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$PG_DATA/postgresql.conf" <<EOF

# cachekit demo
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
fsync = off
shared_preload_libraries = 'cachekit'
cachekit.redis_url = 'redis://127.0.0.1:$REDIS_PORT/0'
cachekit.database = 'postgres'
EOF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
    || die "PostgreSQL did not start"

psql_base=(runuser -u postgres -- "$PG_BIN/psql" -X -h "$WORK" -p "$PG_PORT" -d postgres
           -v ON_ERROR_STOP=1 --pset=footer=off)
# Show and run SQL, one session: each statement is echoed (through psql's
# \echo, so that it appears right before its own result) and then run.
sql() {
    local script='' stmt='' line esc first=1
    while IFS= read -r line; do
        esc=${line//\\/\\\\}
        esc=${esc//\'/\'\'}
        if ((first)); then
            script+="\\echo '@@SQL1@@$esc'"$'\n'
        else
            script+="\\echo '@@SQL2@@$esc'"$'\n'
        fi
        first=0
        stmt+="$line"$'\n'
        if [[ $line == *';' ]]; then
            script+=$stmt
            stmt='' first=1
        fi
    done <<<"$1"
    script+=$stmt
    printf '%s' "$script" | "${psql_base[@]}" -q -f - |
        sed -e "s/^@@SQL1@@/${CYN}postgres=# ${RST}/;t" \
            -e "s/^@@SQL2@@/${CYN}postgres-# ${RST}/;t" \
            -e '/^$/d;s/^/  /'
}
# run SQL quietly, print the bare result
sql_value() { "${psql_base[@]}" -qAt -c "$1"; }
# show and run a redis command
redis() {
    printf '%sredis> %s%s\n' "$CYN" "$*" "$RST"
    rcli "$@" | sed 's/^/  /'
}
show_keys() {
    local keys
    keys=$(rcli --raw KEYS '*' | sed '/^$/d' | LC_ALL=C sort)
    printf '%sRedis keys now:%s' "$B" "$RST"
    if [[ -z $keys ]]; then
        printf ' (none)\n'
        return
    fi
    printf '\n'
    local k
    while IFS= read -r k; do
        if [[ $(rcli --raw TYPE "$k") == set ]]; then
            printf '  %-22s set {%s}\n' "$k" "$(rcli --raw SMEMBERS "$k" | LC_ALL=C sort | paste -sd, -)"
        else
            printf '  %-22s %s\n' "$k" "$(rcli --raw GET "$k")"
        fi
    done <<<"$keys"
}
wait_delivered() {
    printf '%spostgres=# %sSELECT cachekit_wait('"'"'5 seconds'"'"');\n' "$CYN" "$RST"
    local ok
    ok=$(sql_value "SELECT cachekit_wait('5 seconds')")
    printf '  %s\n' "$ok"
    [[ $ok == t ]] || printf '%s  (the queue was not drained within 5 seconds)%s\n' "$RED" "$RST"
}
expect_gone() {
    local k
    for k in "$@"; do
        if [[ $(rcli --raw EXISTS "$k") == 0 ]]; then
            printf '  %sok%s   %s is gone\n' "$GRN" "$RST" "$k"
        else
            printf '  %sFAIL%s %s is still there\n' "$RED" "$RST" "$k"
            FAILURES=$((FAILURES + 1))
        fi
    done
}
expect_kept() {
    local k
    for k in "$@"; do
        if [[ $(rcli --raw EXISTS "$k") == 1 ]]; then
            printf '  %sok%s   %s is still cached\n' "$GRN" "$RST" "$k"
        else
            printf '  %sFAIL%s %s was deleted\n' "$RED" "$RST" "$k"
            FAILURES=$((FAILURES + 1))
        fi
    done
}

printf '\n%sPostgreSQL 15 on 127.0.0.1:%s, redis-server on 127.0.0.1:%s (temporary, in %s)%s\n' \
    "$B" "$PG_PORT" "$REDIS_PORT" "$WORK" "$RST"

# =============================================================================
step "A table, the extension, and a trigger that says which cache entries a row feeds"
explain "Each row is cached under user:<id> and user:email:<email>, and belongs to the"
explain "tag team:<team_id> (a Redis set tag:team:<team_id> listing the keys to drop with it)."
sql "CREATE TABLE users (id int PRIMARY KEY, email text, team_id int, name text);
CREATE EXTENSION cachekit;
CREATE TRIGGER users_cache
    AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION
    cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');"

explain "waiting for the background worker to pick the new extension up..."
for ((n = 0; n < 200; n++)); do
    [[ $(sql_value "SELECT worker_pid IS NOT NULL FROM cachekit_stats") == t ]] && break
    sleep 0.05
done
sql "SELECT worker_pid, queue_depth FROM cachekit_stats;"

# =============================================================================
step "Insert some users"
sql "INSERT INTO users VALUES
    (1, 'ann@x', 7, 'Ann'),
    (2, 'bob@x', 7, 'Bob'),
    (3, 'cid@x', 8, 'Cid'),
    (4, 'dee@x', 8, 'Dee');"
wait_delivered

# =============================================================================
step "The application fills the cache (cache-aside: read from the database, SET in Redis)"
for row in "1 ann@x 7 Ann" "2 bob@x 7 Bob" "3 cid@x 8 Cid" "4 dee@x 8 Dee"; do
    read -r id email team name <<<"$row"
    redis SET "user:$id" "{\"id\":$id,\"email\":\"$email\",\"team_id\":$team,\"name\":\"$name\"}"
    redis SET "user:email:$email" "$id"
done
redis SET list:team:7 '[1,2]'
redis SET list:team:8 '[3,4]'
redis SADD tag:team:7 user:1 user:2 list:team:7
redis SADD tag:team:8 user:3 user:4 list:team:8
redis SET user:email:cid@new 'null'
explain "(user:email:cid@new caches \"no such user\", a lookup that missed)"
redis SET homepage '<html>4 users</html>'
show_keys

# =============================================================================
step "UPDATE a user's email: the keys for the old and the new row go, and its team's tag"
sql "UPDATE users SET email = 'cid@new' WHERE id = 3;"
wait_delivered
show_keys
expect_gone user:3 user:email:cid@x user:email:cid@new tag:team:8 user:4 list:team:8
expect_kept user:1 user:2 user:email:ann@x list:team:7 tag:team:7 homepage

# =============================================================================
step "A transaction that rolls back deletes nothing"
sql "BEGIN;
UPDATE users SET name = 'Ann B.' WHERE id = 1;
DELETE FROM users WHERE id = 2;
ROLLBACK;"
wait_delivered
sleep 1
sql "SELECT queue_depth FROM cachekit_stats;"
show_keys
expect_kept user:1 user:2 user:email:ann@x user:email:bob@x list:team:7 tag:team:7

# =============================================================================
step "Flush a whole tag by hand: every key in the set tag:team:7, and the set"
sql "SELECT cachekit_flush_tag('team:7');"
wait_delivered
show_keys
expect_gone tag:team:7 user:1 user:2 list:team:7
expect_kept user:email:ann@x homepage

# =============================================================================
step "Delete a key by hand (inside a transaction: only once it commits)"
sql "BEGIN;
SELECT cachekit_delete('homepage');
COMMIT;"
wait_delivered
show_keys
expect_gone homepage

# =============================================================================
step "What the worker did"
printf '%spostgres=# %s\\x on\n%spostgres=# %sSELECT * FROM cachekit_stats;\n' "$CYN" "$RST" "$CYN" "$RST"
"${psql_base[@]}" -q -x -c "SELECT * FROM cachekit_stats;" | sed '/^$/d; s/^/  /'

# =============================================================================
printf '\n'
if ((FAILURES)); then
    printf '%sdemo finished with %d failed check(s)%s\n' "$RED" "$FAILURES" "$RST"
    exit 1
fi
printf '%sdemo finished: every check passed%s\n' "$GRN" "$RST"
exit 0
