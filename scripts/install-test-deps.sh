#!/usr/bin/env bash
# Installs what the test suite needs from Debian packages, when missing: `redis-server`
# and the PostgreSQL server (`initdb`, `postgres`, `pg_ctl`, which Debian puts in
# /usr/lib/postgresql/<version>/bin, outside PATH). Idempotent: when everything is
# present it only checks and exits. Never starts the system services: the tests start
# their own servers in temporary directories.
set -euo pipefail

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_postgres() {
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        if [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && [ -x "$bin/pg_ctl" ]; then
            return 0
        fi
    done
    return 1
}

if have_redis && have_postgres && id -u postgres >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
# Keep package scripts from starting the system services (redis, postgresql): policy-rc.d
# exit code 101 means "action not allowed". Removed again afterwards if we created it.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server postgresql

have_redis || { echo "install-test-deps: redis-server is still missing" >&2; exit 1; }
have_postgres || { echo "install-test-deps: the PostgreSQL server binaries are still missing" >&2; exit 1; }
