#!/usr/bin/env bash
# A PostgreSQL server on localhost from Debian's package, with a `bench` role and database,
# for `bench run --storage postgresql://...` (many workers, heartbeats, retries) and its tests.
#
#   sudo slurm/local-postgres.sh [start|stop|url]        (idempotent; start is the default)
#
# Prints the storage URL: postgresql://bench:bench@localhost:5432/bench (override with
# BENCH_PG_PORT, BENCH_PG_PASSWORD).
set -Eeuo pipefail
trap 'rc=$?; echo "local-postgres.sh: failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' ERR

action=${1:-start}
port=${BENCH_PG_PORT:-5432}
password=${BENCH_PG_PASSWORD:-bench}
url="postgresql://bench:$password@localhost:$port/bench"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then echo "local-postgres.sh: run as root (sudo)" >&2; exit 1; fi
}

install_packages() {
    if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && command -v pg_ctlcluster \
        >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql >/dev/null
}

cluster() {  # version and name of the first cluster, created if there is none
    local line
    line=$(pg_lsclusters --no-header 2>/dev/null | head -1 || true)
    if [ -z "$line" ]; then
        local ver
        ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
        pg_createcluster --port "$port" "$ver" main >/dev/null
        line=$(pg_lsclusters --no-header | head -1)
    fi
    echo "$line" | awk '{print $1, $2}'
}

psql_admin() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }

start() {
    need_root
    install_packages
    read -r ver name < <(cluster)
    local did="reused: PostgreSQL $ver/$name was already running"
    if ! pg_lsclusters --no-header | awk -v v="$ver" -v n="$name" '$1==v && $2==n' \
        | grep -q online; then
        pg_ctlcluster "$ver" "$name" start
        did="started: PostgreSQL $ver/$name"
    fi
    for _ in $(seq 1 40); do
        runuser -u postgres -- pg_isready -q -p "$port" && break
        sleep 0.25
    done
    if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='bench'")" != 1 ]; then
        psql_admin "CREATE ROLE bench LOGIN PASSWORD '$password'"
    fi
    if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='bench'")" != 1 ]; then
        psql_admin "CREATE DATABASE bench OWNER bench"
    fi
    echo "local-postgres.sh: $did, serving $url" >&2
    echo "$url"
}

stop() {
    need_root
    pg_lsclusters --no-header 2>/dev/null | awk '$4=="online" {print $1, $2}' \
        | while read -r ver name; do pg_ctlcluster "$ver" "$name" stop; done
    echo "postgresql stopped"
}

case "$action" in
    start) start ;;
    stop) stop ;;
    url) echo "$url" ;;
    *) echo "usage: $0 [start|stop|url]" >&2; exit 2 ;;
esac
