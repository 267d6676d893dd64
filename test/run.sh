#!/usr/bin/env bash
# test/run.sh -- build, install and test cachekit (the README's test command).
#
# Run as root, from any directory:
#
#   bash test/run.sh                     everything: pg_regress, all TAP tests, then the
#                                        Debian package stage (below)
#   bash test/run.sh regress             only the pg_regress tests
#   bash test/run.sh tap                 only the TAP tests (test/t/*.pl)
#   bash test/run.sh tap test/t/001_harness.pl ...   only these TAP tests
#   bash test/run.sh deb                 only the Debian package stage: packaging/build-deb.sh
#                                        builds the .deb, runs lintian, installs it over the
#                                        make-installed files and runs a smoke test against
#                                        them (so it runs last); CACHEKIT_DEB_STAGE=0 skips it
#
# It calls test/setup.sh (packages, build as postgres, make install), then,
# as the postgres user in the build folder, "make installcheck": pg_regress
# runs against a private server (--temp-instance, test/regress.conf) and
# prove runs the TAP tests, which start their own servers and their own
# redis-server instances on free loopback ports (no system Redis is used).
#
# The two halves are run as separate make invocations so that a pg_regress
# failure does not hide the TAP results. On failure the regression diffs and
# the tails of the logs are printed. Exit status 0 only if every test passed.
#
# Environment:
#   CACHEKIT_BUILD_DIR        build folder (default /tmp/cachekit-build)
#   CACHEKIT_REGRESS_TIMEOUT  seconds allowed for pg_regress (default 600)
#   CACHEKIT_TAP_TIMEOUT      seconds allowed for the TAP tests (default 1800)
#   CACHEKIT_PG_BIN           PostgreSQL 15 bin folder (default /usr/lib/postgresql/15/bin);
#                             a relocated copy lets several checkouts install side by side
#   CACHEKIT_DEB_STAGE        0: skip the Debian package stage of a full run
#   PG_TEST_TIMEOUT_DEFAULT, PG_TEST_NOCLEAN and PG_TEST_PORT_DIR are passed through.

set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=$PG_BIN/pg_config
export CACHEKIT_BUILD_DIR=${CACHEKIT_BUILD_DIR:-/tmp/cachekit-build}
BUILD_DIR=$CACHEKIT_BUILD_DIR
REGRESS_TIMEOUT=${CACHEKIT_REGRESS_TIMEOUT:-600}
TAP_TIMEOUT=${CACHEKIT_TAP_TIMEOUT:-1800}
MAKE_FLAGS=(with_llvm=no "PG_CONFIG=$PG_CONFIG")

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }

[[ $(id -u) -eq 0 ]] || die "must be run as root (it installs packages and runs make install)"

# ---- arguments ------------------------------------------------------------
run_regress=1 run_tap=1 run_deb=${CACHEKIT_DEB_STAGE:-1}
tap_files=()
case ${1:-} in
    "") ;;
    regress) run_tap=0 run_deb=0; shift ;;
    tap) run_regress=0 run_deb=0; shift; tap_files=("$@") ;;
    deb) run_regress=0 run_tap=0 run_deb=1; shift ;;
    -h|--help) sed -n '2,33p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac
for f in "${tap_files[@]}"; do
    f=${f#./}
    [[ $f == test/t/*.pl ]] || die "TAP test files are given as test/t/NAME.pl (got '$f')"
    [[ -f $SCRIPT_DIR/../$f ]] || die "no such TAP test: $f"
done
tap_files=("${tap_files[@]#./}")

# ---- stop servers the tests left behind ----------------------------------
# Only processes whose pid file lies in our build folder, i.e. that these
# tests started (a killed or timed-out test run can leave them running).
# Each gets a grace period first: after a timeout the test scripts may still
# be stopping their own servers.
pid_alive_as() {                    # pid, command name
    [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}
stop_leftovers() {
    local f pid n
    [[ -d $BUILD_DIR ]] || return 0
    while IFS= read -r f; do
        pid=$(head -n 1 "$f" 2>/dev/null)
        for ((n = 0; n < 100; n++)); do pid_alive_as "$pid" postgres || break; sleep 0.1; done
        if pid_alive_as "$pid" postgres; then
            echo "run.sh: stopping leftover postgres $pid ($(dirname "$f"))"
            kill -QUIT "$pid" 2>/dev/null
            for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
    done < <(find "$BUILD_DIR" -name postmaster.pid -path '*tmp_check*' 2>/dev/null)
    while IFS= read -r f; do
        pid=$(head -n 1 "$f" 2>/dev/null)
        for ((n = 0; n < 50; n++)); do pid_alive_as "$pid" redis-server || break; sleep 0.1; done
        if pid_alive_as "$pid" redis-server; then
            echo "run.sh: stopping leftover redis-server $pid ($f)"
            kill -CONT "$pid" 2>/dev/null
            kill -TERM "$pid" 2>/dev/null
            for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
    done < <(find "$BUILD_DIR" -name 'redis*.pid' -path '*tmp_check*' 2>/dev/null)
    return 0
}
trap stop_leftovers EXIT
trap 'exit 130' INT TERM

# ---- build and install -----------------------------------------------------
say "setup (packages, build, install)"
bash "$SCRIPT_DIR/setup.sh" || die "setup failed"
command -v redis-server >/dev/null || die "redis-server is not installed"
command -v redis-cli >/dev/null || die "redis-cli is not installed"

cd "$BUILD_DIR" || die "no build folder $BUILD_DIR"

# Run make as postgres with a clean, predictable environment: the
# PostgreSQL 15 programs first in PATH (PostgreSQL::Test::Cluster calls
# initdb, pg_ctl and postgres by name), a locale that always exists, and no
# libpq settings inherited from the caller.
as_postgres_make() {                # timeout seconds, make arguments...
    local secs=$1
    shift
    local -a envv=(
        "PATH=$PG_BIN:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        "HOME=$BUILD_DIR" "LANG=C.UTF-8" "LC_ALL=C.UTF-8"
        "CACHEKIT_BUILD_DIR=$BUILD_DIR"
        "CACHEKIT_SRC_DIR=$(cd "$SCRIPT_DIR/.." && pwd)"    # the checkout, for tests that ask git
    )
    local v
    for v in PG_TEST_TIMEOUT_DEFAULT PG_TEST_NOCLEAN PG_TEST_PORT_DIR CI; do
        [[ -n ${!v+x} ]] && envv+=("$v=${!v}")
    done
    runuser -u postgres -- env -i "${envv[@]}" \
        timeout --kill-after=30 "$secs" make "$@" "${MAKE_FLAGS[@]}"
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "run.sh: make $* timed out after ${secs}s" >&2
    fi
    return $rc
}

show_tail() {                       # file, lines
    [[ -f $1 ]] || return 0
    printf '\n----- %s (last %s lines) -----\n' "$1" "$2"
    tail -n "$2" "$1"
}

regress_rc=skipped tap_rc=skipped deb_rc=skipped

# ---- pg_regress -----------------------------------------------------------
if ((run_regress)); then
    say "pg_regress (make installcheck, temp instance with test/regress.conf)"
    rm -f regression.diffs regression.out
    # TAP_TESTS= (empty) disables the prove half of installcheck
    as_postgres_make "$REGRESS_TIMEOUT" installcheck TAP_TESTS=
    regress_rc=$?
    stop_leftovers
    if ((regress_rc != 0)); then
        if [[ -f regression.diffs ]]; then
            printf '\n----- %s/regression.diffs (first 400 lines) -----\n' "$BUILD_DIR"
            head -n 400 regression.diffs
        fi
        for f in log/*.log; do
            show_tail "$f" 60
        done
    fi
fi

# ---- TAP tests ----------------------------------------------------------------
if ((run_tap)); then
    shopt -s nullglob
    all_tap=(test/t/*.pl)
    shopt -u nullglob
    if ((${#tap_files[@]} == 0 && ${#all_tap[@]} == 0)); then
        say "no TAP tests in test/t"
        tap_rc=0
    else
        say "TAP tests (make installcheck, prove ${tap_files[*]:-test/t/*.pl})"
        # REGRESS= (empty) skips pg_regress. PROVE_FLAGS is given on the
        # command line because PGXS's Makefile.global, included after the
        # Makefile sets it, resets it to empty.
        args=(installcheck REGRESS= "PROVE_FLAGS=-I $BUILD_DIR/test/perl --verbose")
        ((${#tap_files[@]})) && args+=("PROVE_TESTS=${tap_files[*]}")
        as_postgres_make "$TAP_TIMEOUT" "${args[@]}"
        tap_rc=$?
        stop_leftovers
        if ((tap_rc != 0)); then
            shopt -s nullglob
            fail_re='not ok|Looks like your test|Bailout|BAIL_OUT'
            for f in tmp_check/log/regress_log_*; do
                # failed, or never finished (no plan line: died or timed out)
                if ! grep -qE "$fail_re" "$f" && grep -qE '^(\[[^]]*\]\([^)]*\) )?1\.\.[0-9]+$' "$f"; then
                    continue
                fi
                t=${f##*/regress_log_}
                printf '\n----- %s: failures -----\n' "$f"
                grep -E -A6 "$fail_re" "$f" | head -n 150
                show_tail "$f" 40
                # this test's server logs, without the statement lines
                for g in "tmp_check/log/${t}"_*.log; do
                    printf '\n----- %s (last 40 lines, statements left out) -----\n' "$g"
                    grep -v 'LOG:  statement: ' "$g" | tail -n 40
                done
                for g in "tmp_check/redis_${t}"_*/redis.log; do
                    show_tail "$g" 8
                done
            done
            shopt -u nullglob
        fi
    fi
fi

# ---- Debian package (last: it installs over the make-installed files) ----------
if ((run_deb)); then
    say "Debian package (packaging/build-deb.sh: build, lintian, install, smoke test)"
    bash "$SCRIPT_DIR/../packaging/build-deb.sh"
    deb_rc=$?
fi

# ---- summary ------------------------------------------------------------------
verdict() { case $1 in skipped) echo skipped ;; 0) echo PASS ;; *) echo "FAIL (exit $1)" ;; esac; }
say "summary"
echo "  pg_regress: $(verdict "$regress_rc")"
echo "  TAP:        $(verdict "$tap_rc")"
echo "  package:    $(verdict "$deb_rc")"
echo "  logs:       $BUILD_DIR (regression.diffs, log/postmaster.log, tmp_check/log)"

[[ $regress_rc == 0 || $regress_rc == skipped ]] || exit 1
[[ $tap_rc == 0 || $tap_rc == skipped ]] || exit 1
[[ $deb_rc == 0 || $deb_rc == skipped ]] || exit 1
if ((run_regress == 0 && run_tap == 0 && run_deb == 0)); then exit 1; fi
echo "  all tests passed"
exit 0
