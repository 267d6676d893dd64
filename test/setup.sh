#!/usr/bin/env bash
# test/setup.sh -- install what cachekit needs, build it, install it.
#
# Run as root, from any directory:   bash test/setup.sh
#
#  1. installs the Debian packages below if any is missing (apt-get update is
#     only run when something has to be installed, so a re-run is quick);
#  2. copies the source tree (without .git) into a build folder owned by the
#     postgres user and runs "make" there as postgres;
#  3. runs "make install" there as root.
#
# The build folder is $CACHEKIT_BUILD_DIR, default /tmp/cachekit-build. It is
# recreated from scratch on every run (so files deleted from the checkout do
# not linger) and is left in place afterwards: test/run.sh runs the tests in
# it, and the test logs end up in it. The last line printed on stdout is
# "CACHEKIT_BUILD_DIR=<path>".
#
# The git checkout itself is never written to or chowned.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=$PG_BIN/pg_config
BUILD_DIR=${CACHEKIT_BUILD_DIR:-/tmp/cachekit-build}
MAKE_FLAGS=(with_llvm=no "PG_CONFIG=$PG_CONFIG")
MARKER=.cachekit-build-dir

PACKAGES=(postgresql-15 postgresql-server-dev-15 libhiredis-dev redis-server
          redis-tools libipc-run-perl make gcc
          postgresql-server-dev-all debhelper dpkg-dev fakeroot lintian libssl-dev openssl
          prometheus-postgres-exporter
          python3-redis python3-pytest)   # the lease client tests (clients/python)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must be run as root (it installs packages and runs make install)"
[[ -f $SRC_DIR/Makefile && -f $SRC_DIR/cachekit.control ]] \
    || die "$SRC_DIR does not look like the cachekit source tree"

# ---------------------------------------------------------------------------
# 1. packages
# ---------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    say "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q </dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" </dev/null
else
    say "all required packages are installed"
fi

[[ -x $PG_CONFIG ]] || die "$PG_CONFIG not found after installing packages"
command -v redis-server >/dev/null || die "redis-server not found after installing packages"
command -v redis-cli >/dev/null || die "redis-cli not found after installing packages"
id postgres >/dev/null 2>&1 || die "there is no postgres user (package postgresql-15 creates it)"

# ---------------------------------------------------------------------------
# 2. fresh build folder owned by postgres
# ---------------------------------------------------------------------------
case $BUILD_DIR in
    /*) ;;
    *) die "CACHEKIT_BUILD_DIR must be an absolute path (got '$BUILD_DIR')" ;;
esac
case "$BUILD_DIR/" in
    "$SRC_DIR"/*) die "the build folder must not be inside the checkout ($SRC_DIR)" ;;
esac

if [[ -e $BUILD_DIR ]]; then
    # Only ever delete a folder this script created.
    [[ -f $BUILD_DIR/$MARKER ]] \
        || die "$BUILD_DIR exists but was not created by setup.sh; remove it or set CACHEKIT_BUILD_DIR"
    rm -rf -- "$BUILD_DIR"
fi
install -d -o postgres -g postgres -m 0755 "$BUILD_DIR"
touch "$BUILD_DIR/$MARKER"

# The postgres user must be able to reach the build folder (/tmp is fine,
# but CACHEKIT_BUILD_DIR might point somewhere else).
runuser -u postgres -- test -w "$BUILD_DIR" \
    || die "the postgres user cannot write to $BUILD_DIR (check the parent folders' permissions)"

say "copying $SRC_DIR to $BUILD_DIR"
# Read as root, write as postgres, so every copied file belongs to postgres.
tar -C "$SRC_DIR" --exclude=./.git --exclude=./build --exclude=./tmp_check \
    --exclude=./tmp_check_regress --exclude=./results --exclude='*.o' \
    --exclude='*.so' --exclude='*.bc' --exclude=node_modules -cf - . \
    | (cd "$BUILD_DIR" && runuser -u postgres -- tar --no-same-owner -xf -)

# The lease client tests (clients/node): Node.js 20 and npm come with the
# machine image; ioredis comes from the npm registry, as pinned by
# clients/node/package-lock.json, into the build folder.
command -v node >/dev/null && command -v npm >/dev/null \
    || die "node and npm are not installed: the client tests need Node.js 20 with npm (https://nodejs.org, or Debian's nodejs + npm)"
node_major=$(node --version | sed -n 's/^v\([0-9]*\)\..*/\1/p')
[[ ${node_major:-0} -ge 18 ]] || die "node $(node --version) is too old: the client tests need Node.js 20"
say "installing clients/node's modules (npm ci)"
(cd "$BUILD_DIR/clients/node" &&
    runuser -u postgres -- env HOME="$BUILD_DIR" npm_config_cache="$BUILD_DIR/.npm" \
        npm ci --no-audit --no-fund --loglevel=error >&2) \
    || die "npm ci failed in $BUILD_DIR/clients/node (is the npm registry reachable?)"

# ---------------------------------------------------------------------------
# 3. build as postgres, install as root
# ---------------------------------------------------------------------------
jobs=$(nproc 2>/dev/null || echo 2)

say "building (make ${MAKE_FLAGS[*]})"
(cd "$BUILD_DIR" &&
    runuser -u postgres -- env PATH="$PG_BIN:$PATH" \
        make -j"$jobs" "${MAKE_FLAGS[@]}") \
    || die "build failed in $BUILD_DIR"

# CACHEKIT_NO_INSTALL=1: test the files installed already (packaging/build-deb.sh
# runs the tests against the installed Debian package this way)
if [[ ${CACHEKIT_NO_INSTALL:-} == 1 ]]; then
    say "not installing (CACHEKIT_NO_INSTALL=1): testing the files installed already"
else
say "installing (make install ${MAKE_FLAGS[*]})"
(cd "$BUILD_DIR" && env PATH="$PG_BIN:$PATH" make install "${MAKE_FLAGS[@]}" >/dev/null) \
    || die "make install failed in $BUILD_DIR"
fi

say "cachekit installed into $("$PG_CONFIG" --pkglibdir) and $("$PG_CONFIG" --sharedir)/extension"
echo "CACHEKIT_BUILD_DIR=$BUILD_DIR"
