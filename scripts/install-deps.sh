#!/usr/bin/env bash
# Installs what the integration clients and the benchmark need on Debian 12:
# apt packages (only the missing ones; SoftHSM2 and PyKMIP's server for the
# PKCS#11 and KMIP tests), the Python venv at <repo>/.venv, the node packages
# of integration/node, and the compiled JDBC client.
# Idempotent: when everything is present it only checks and prints "ok" lines.
# Needs no network other than Debian apt, PyPI and npm.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JDBC_JAR=/usr/share/java/postgresql.jar
PG_BIN=/usr/lib/postgresql/15/bin

step() { printf '[install-deps] %-28s %s\n' "$1" "$2"; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=()
fi

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ---- apt packages -----------------------------------------------------------
# Each entry: package, and a test that is true when what we need from it is
# already there (a runtime may come from another package, e.g. nodesource's
# nodejs ships npm; openjdk-17-jdk-headless provides javac).
missing=()
check() { # name, test command...
    local pkg="$1"; shift
    if "$@" >/dev/null 2>&1; then
        step "apt $pkg" "ok (present)"
    else
        missing+=("$pkg")
    fi
}
check postgresql           test -x "$PG_BIN/initdb" -a -x "$PG_BIN/postgres"
check postgresql-contrib   test -x /usr/bin/pgbench
check pgbouncer            bash -c "test -x /usr/sbin/pgbouncer || command -v pgbouncer"
check haproxy              bash -c "test -x /usr/sbin/haproxy || command -v haproxy"
check softhsm2             test -f /usr/lib/softhsm/libsofthsm2.so -a -x /usr/bin/softhsm2-util
check python3-pykmip       test -x /usr/bin/pykmip-server
check libpostgresql-jdbc-java test -f "$JDBC_JAR"
check default-jdk-headless bash -c 'command -v javac && command -v java'
check nodejs               command -v node
check npm                  command -v npm
check python3-venv         /usr/bin/python3 -c 'import venv, ensurepip'
check openssl              command -v openssl
# The pg_query crate compiles libpg_query (PostgreSQL's parser) and makes
# its Rust bindings with bindgen, which needs libclang.
check libclang-dev         bash -c 'ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* 2>/dev/null | grep -q .'

if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ] || die "need root or sudo to install: ${missing[*]}"
    step "apt-get update" "(missing: ${missing[*]})"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    step "apt-get install" "${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    for pkg in "${missing[@]}"; do step "apt $pkg" "installed"; done
fi

# The Debian pgbouncer package enables a system service on port 6432; the
# benchmark runs its own instance, so make sure the system one is not in the way.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet pgbouncer 2>/dev/null; then
    "${SUDO[@]}" systemctl stop pgbouncer >/dev/null 2>&1 || true
    step "pgbouncer service" "stopped (benchmark starts its own)"
fi

# ---- Citus (tests against a distributed PostgreSQL) -------------------------
# Citus is not packaged for Debian 12; its release source is vendored beside
# the repo (../shared/vendor/citus, or $CITUS_VENDOR_DIR) and built here once.
CITUS_DIR="${CITUS_VENDOR_DIR:-$REPO/../shared/vendor/citus}"
CITUS_VERSION=13.2.2
CITUS_SO="$(dirname "$PG_BIN")/lib/citus.so"
if [ -f "$CITUS_SO" ]; then
    step "citus" "ok ($CITUS_SO)"
elif [ ! -f "$CITUS_DIR/citus-$CITUS_VERSION.tar.gz" ]; then
    step "citus" "skipped: no $CITUS_DIR/citus-$CITUS_VERSION.tar.gz (Citus tests will be skipped)"
else
    [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ] || die "need root or sudo to build Citus"
    citus_deps=(postgresql-server-dev-15 liblz4-dev libzstd-dev libkrb5-dev libselinux1-dev libxslt1-dev libpam0g-dev)
    citus_missing=()
    for pkg in "${citus_deps[@]}"; do have_pkg "$pkg" || citus_missing+=("$pkg"); done
    if [ "${#citus_missing[@]}" -gt 0 ]; then
        step "apt-get install" "${citus_missing[*]} (to build Citus)"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${citus_missing[@]}" >/dev/null
    fi
    citus_build="$(mktemp -d)"
    trap 'rm -rf "$citus_build"' EXIT
    tar xzf "$CITUS_DIR/citus-$CITUS_VERSION.tar.gz" -C "$citus_build"
    if [ -f "$CITUS_DIR/pg15-have_createdb_privilege.patch" ]; then
        (cd "$citus_build" && patch -s -p0 < "$CITUS_DIR/pg15-have_createdb_privilege.patch")
    fi
    step "citus" "building $CITUS_VERSION (about 2 minutes)"
    (cd "$citus_build/citus-$CITUS_VERSION" \
        && PG_CONFIG="$PG_BIN/pg_config" ./configure --without-libcurl >"$citus_build/configure.log" 2>&1 \
        && make -j"$(nproc)" >"$citus_build/make.log" 2>&1 \
        && "${SUDO[@]}" make install >"$citus_build/install.log" 2>&1) \
        || { tail -30 "$citus_build"/*.log >&2; die "Citus build failed"; }
    step "citus" "installed $CITUS_SO"
fi

# ---- Python venv ------------------------------------------------------------
VENV="$REPO/.venv"
PY_PKGS=("psycopg[binary]" "moto[server]" sqlalchemy pytest django)
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
    step "python venv" "created $VENV"
else
    step "python venv" "ok ($VENV)"
fi
if "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import psycopg, psycopg_binary, moto, sqlalchemy, pytest, django, flask  # flask comes with moto[server]
EOF
then
    step "python packages" "ok (psycopg, moto, sqlalchemy, pytest, django)"
else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}"
    step "python packages" "installed ${PY_PKGS[*]}"
fi

# ---- node packages ----------------------------------------------------------
NODE_DIR="$REPO/integration/node"
if [ -f "$NODE_DIR/node_modules/.package-lock.json" ] \
    && cmp -s <(sed -n '/"packages"/,$p' "$NODE_DIR/package-lock.json" | grep -c '"node_modules/') \
              <(sed -n '/"packages"/,$p' "$NODE_DIR/node_modules/.package-lock.json" | grep -c '"node_modules/') \
    && (cd "$NODE_DIR" && node -e 'require("pg")') >/dev/null 2>&1; then
    step "node packages" "ok (integration/node/node_modules)"
else
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    step "node packages" "installed (npm ci in integration/node)"
fi

# ---- JDBC clients -----------------------------------------------------------
JAVA_DIR="$REPO/integration/java"
stale=()
for src in "$JAVA_DIR"/*.java; do
    class="$JAVA_DIR/build/$(basename "$src" .java).class"
    if [ ! -f "$class" ] || [ "$src" -nt "$class" ]; then stale+=("$src"); fi
done
if [ "${#stale[@]}" -eq 0 ]; then
    step "java clients" "ok (integration/java/build)"
else
    mkdir -p "$JAVA_DIR/build"
    javac -nowarn -encoding UTF-8 -cp "$JDBC_JAR" -d "$JAVA_DIR/build" "${stale[@]}"
    step "java clients" "compiled ${stale[*]##*/}"
fi

step "done" "all client dependencies present"
