#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 for the storage tests, when the server
# binaries are installed (Debian: apt-get install postgresql). Prints the SQLAlchemy URL.
# Usage: scripts/postgres.sh start DIR | stop DIR
set -euo pipefail
action=$1 dir=$2
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || exit 1
run() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
port=${DOCANALYST_TEST_PG_PORT:-55432}
case $action in
start)
    mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    run "'$bin/initdb' -D '$dir/data' -A trust -U postgres" >/dev/null
    run "'$bin/pg_ctl' -D '$dir/data' -o '-c listen_addresses=127.0.0.1 -p $port -k $dir' -l '$dir/server.log' -w start" >/dev/null
    psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE docanalyst_test" >/dev/null
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/docanalyst_test" ;;
stop)
    run "'$bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null 2>&1 || true
    rm -rf "$dir" ;;
esac
