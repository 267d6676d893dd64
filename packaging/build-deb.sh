#!/usr/bin/env bash
# packaging/build-deb.sh -- build the Debian package, check it, install it and
# test the installed files.
#
# Run as root, from any directory:
#
#   bash packaging/build-deb.sh           build, lintian, install, smoke test
#   bash packaging/build-deb.sh --full    the same, then the whole suite (pg_regress
#                                         and TAP) against the installed package
#   bash packaging/build-deb.sh --build   build and lintian only
#
#  1. installs the build dependencies (debian/control) and lintian if missing;
#  2. copies the source tree (without .git) into a folder of its own and runs
#     "dpkg-buildpackage -us -uc -b" there (debian/rules: dh with pg_buildext);
#  3. runs lintian on the result and fails on any error;
#  4. installs postgresql-15-cachekit_<version>-1_amd64.deb with its
#     dependencies (apt-get install --reinstall ./file.deb) and checks the installed files
#     against the package (dpkg --verify);
#  5. runs tests against the installed files (test/run.sh with
#     CACHEKIT_NO_INSTALL=1, so that nothing is built over them): the smoke
#     test is 010_invalidate (CREATE EXTENSION, triggers, delivery to a real
#     redis-server) and 180_upgrade (0.1.0 -> current on the packaged
#     scripts); --full runs pg_regress and every TAP test.
#
# With CACHEKIT_PG_BIN pointing to a relocated PostgreSQL copy (a developer
# machine where several checkouts install side by side), step 4 does not
# touch the system's PostgreSQL: it checks that apt could install the package
# and that its dependencies are installed, then unpacks the package's files
# into that copy's pkglibdir and sharedir.
#
# Environment: CACHEKIT_PG_BIN, CACHEKIT_BUILD_DIR, PG_TEST_PORT_DIR as for
# test/run.sh; CACHEKIT_DEB_DIR is the packaging folder (default
# <build folder>-deb; the .deb files are left there, and the logs of the
# tests against the package in its test-build/).

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
PG_BIN=${CACHEKIT_PG_BIN:-/usr/lib/postgresql/15/bin}
SYSTEM_PG_BIN=/usr/lib/postgresql/15/bin
export CACHEKIT_BUILD_DIR=${CACHEKIT_BUILD_DIR:-/tmp/cachekit-build}
DEB_DIR=${CACHEKIT_DEB_DIR:-$CACHEKIT_BUILD_DIR-deb}
MARKER=.cachekit-deb-dir
SMOKE_TESTS=(test/t/010_invalidate.pl test/t/180_upgrade.pl)
TOOLS=(dpkg-dev debhelper lintian fakeroot)

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'build-deb.sh: %s\n' "$*" >&2; exit 1; }

mode=smoke
case ${1:-} in
    "") ;;
    --full) mode=full ;;
    --build) mode=build ;;
    -h|--help) sed -n '2,34p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

[[ $(id -u) -eq 0 ]] || die "must be run as root (it installs packages)"
cd "$SRC_DIR"

version=$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" cachekit.control)
[[ -n $version ]] || die "no default_version in cachekit.control"
pkg=postgresql-15-cachekit
arch=$(dpkg --print-architecture)
deb=${pkg}_${version}-1_${arch}.deb

# ---------------------------------------------------------------------------
# 1. build dependencies
# ---------------------------------------------------------------------------
build_deps=$(sed -n '/^Build-Depends:/,/^[A-Z]/p' debian/control |
    sed '1s/^Build-Depends://; /^[A-Z]/d' | tr ',' '\n' |
    sed 's/(.*)//; s/[[:space:]]//g' | grep -v '^$')
missing=()
for p in "${TOOLS[@]}" $build_deps; do
    p=${p%%:*}
    [[ $p == debhelper-compat ]] && p=debhelper
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] \
        || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q </dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        "${missing[@]}" </dev/null
fi

# ---------------------------------------------------------------------------
# 2. build in a copy of the tree
# ---------------------------------------------------------------------------
case $DEB_DIR in /*) ;; *) die "CACHEKIT_DEB_DIR must be absolute (got '$DEB_DIR')" ;; esac
if [[ -e $DEB_DIR ]]; then
    [[ -f $DEB_DIR/$MARKER ]] || die "$DEB_DIR exists but was not created by build-deb.sh"
    rm -rf -- "$DEB_DIR"
fi
mkdir -p "$DEB_DIR/cachekit-$version"
touch "$DEB_DIR/$MARKER"
tar -C "$SRC_DIR" --exclude=./.git --exclude=./build --exclude=./tmp_check \
    --exclude=./tmp_check_regress --exclude=./results --exclude='*.o' \
    --exclude='*.so' --exclude='*.bc' -cf - . | tar -C "$DEB_DIR/cachekit-$version" -xf -

say "dpkg-buildpackage -us -uc -b (log: $DEB_DIR/build.log)"
(cd "$DEB_DIR/cachekit-$version" && dpkg-buildpackage -us -uc -b) >"$DEB_DIR/build.log" 2>&1 \
    || { tail -n 60 "$DEB_DIR/build.log"; die "dpkg-buildpackage failed"; }
[[ -f $DEB_DIR/$deb ]] || { ls -l "$DEB_DIR"; die "dpkg-buildpackage did not produce $deb"; }
dpkg-deb -I "$DEB_DIR/$deb" | sed -n 's/^ \(Package\|Version\|Depends\):/  \1:/p'

# ---------------------------------------------------------------------------
# 3. lintian
# ---------------------------------------------------------------------------
say "lintian"
changes=$(ls "$DEB_DIR"/cachekit_"$version"-1_*.changes)
lintian_rc=0
lintian --fail-on error "$changes" >"$DEB_DIR/lintian.log" 2>&1 || lintian_rc=$?
grep -v 'running with root privileges' "$DEB_DIR/lintian.log" || true
((lintian_rc == 0)) || die "lintian reports errors (exit $lintian_rc)"
[[ $mode == build ]] && { echo "built $DEB_DIR/$deb"; exit 0; }

# ---------------------------------------------------------------------------
# 4. install
# ---------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
if [[ $PG_BIN == "$SYSTEM_PG_BIN" ]]; then
    say "apt-get install $deb"
    # --reinstall: the same version may be installed already, with its files
    # since overwritten by "make install" (test/setup.sh)
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --reinstall "$DEB_DIR/$deb" </dev/null
    dpkg-query -W -f='${Version}\n' "$pkg" | grep -qx "$version-1" \
        || die "$pkg $version-1 is not installed"
    # dpkg --verify exits 0 also when it reports changed files: read its output
    changed=$(dpkg --verify "$pkg" 2>&1) || true
    [[ -z $changed ]] || { echo "$changed"; die "installed files differ from the package (dpkg --verify)"; }
else
    # A relocated copy: install the files there, leave the system alone.
    say "checking that apt could install $deb"
    apt-get -s install "$DEB_DIR/$deb" </dev/null >"$DEB_DIR/apt-simulate.log" 2>&1 \
        || { cat "$DEB_DIR/apt-simulate.log"; die "apt cannot install $deb"; }
    for dep in $(dpkg-deb -f "$DEB_DIR/$deb" Depends | tr ',' '\n' | sed 's/(.*)//; s/ //g'); do
        [[ $dep == postgresql-* ]] && continue      # the relocated copy is PostgreSQL
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$dep" 2>/dev/null || true) == installed ]] \
            || die "dependency $dep of $deb is not installed"
    done
    say "unpacking $deb into $(dirname "$(dirname "$(dirname "$(dirname "$PG_BIN")")")")"
    rm -rf "$DEB_DIR/root"
    dpkg-deb -x "$DEB_DIR/$deb" "$DEB_DIR/root"
    pkglib=$("$PG_BIN/pg_config" --pkglibdir)
    share=$("$PG_BIN/pg_config" --sharedir)
    rm -f "$pkglib"/cachekit.so "$share"/extension/cachekit[.-]*
    cp -a "$DEB_DIR/root/usr/lib/postgresql/15/lib/." "$pkglib/"
    cp -a "$DEB_DIR/root/usr/share/postgresql/15/extension/." "$share/extension/"
    (cd "$DEB_DIR/root/usr/lib/postgresql/15/lib" && find . -type f) | while read -r f; do
        cmp -s "$DEB_DIR/root/usr/lib/postgresql/15/lib/$f" "$pkglib/$f" || die "$pkglib/$f differs from the package"
    done
    (cd "$DEB_DIR/root/usr/share/postgresql/15/extension" && find . -type f) | while read -r f; do
        cmp -s "$DEB_DIR/root/usr/share/postgresql/15/extension/$f" "$share/extension/$f" \
            || die "$share/extension/$f differs from the package"
    done
fi

# ---------------------------------------------------------------------------
# 5. tests against the installed files
# ---------------------------------------------------------------------------
run_args=(tap "${SMOKE_TESTS[@]}")
[[ $mode == full ]] && run_args=()          # pg_regress and every TAP test
say "tests against the installed package: ${run_args[*]:-everything}"
# a build folder of its own, so that the logs of a preceding test/run.sh stay
CACHEKIT_NO_INSTALL=1 CACHEKIT_DEB_STAGE=0 CACHEKIT_BUILD_DIR="$DEB_DIR/test-build" \
    bash "$SRC_DIR/test/run.sh" "${run_args[@]}" \
    || die "tests against the installed package failed"
echo "package $DEB_DIR/$deb: built, lintian clean, installed, tests passed"
