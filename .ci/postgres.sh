#!/usr/bin/env bash
# Start a throwaway PostgreSQL on loopback for the multi-worker Optuna tests (Debian's packages).
#
#   source .ci/postgres.sh        # installs postgresql if missing (root + apt), starts it, exports
#                                 # FACEAGE_TEST_POSTGRES=postgresql://faceage@127.0.0.1:$PGPORT/optuna
#   .ci/postgres.sh stop          # stops it
#
# The server runs as the unprivileged 'postgres' user when started by root (PostgreSQL refuses root),
# with trust authentication on 127.0.0.1 only, its data in a temporary folder.
PG_DIR=${FACEAGE_PG_DIR:-/tmp/faceage-postgres}
PGPORT=${FACEAGE_PG_PORT:-55432}

_pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$found" ] && echo "$found"
}

_pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}

_pg_start() {
  local bin
  bin=$(_pg_bin || true)
  if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "postgres: installing Debian's postgresql package"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || {
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
      bin=$(_pg_bin || true)
    fi
    [ -n "$bin" ] || { echo "postgres: no PostgreSQL server found and cannot install one (need root + apt)" >&2; return 1; }
  fi
  if [ -f "$PG_DIR/data/postmaster.pid" ] && _pg_as_owner "$bin/pg_ctl -D $PG_DIR/data status" >/dev/null 2>&1; then
    echo "postgres: already running on 127.0.0.1:$PGPORT"
  else
    rm -rf "$PG_DIR" && mkdir -p "$PG_DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DIR"; fi
    _pg_as_owner "$bin/initdb -D $PG_DIR/data -U faceage --auth=trust -E UTF8" >/dev/null || return 1
    _pg_as_owner "$bin/pg_ctl -D $PG_DIR/data -l $PG_DIR/log -w -o '-c listen_addresses=127.0.0.1 -p $PGPORT -k $PG_DIR -c max_connections=200' start" >/dev/null \
      || { echo "postgres: did not start; its log:" >&2; cat "$PG_DIR/log" >&2; return 1; }
    _pg_as_owner "$bin/createdb -h 127.0.0.1 -p $PGPORT -U faceage optuna" || return 1
    echo "postgres: started $($bin/postgres --version) on 127.0.0.1:$PGPORT (data $PG_DIR)"
  fi
  export FACEAGE_TEST_POSTGRES="postgresql://faceage@127.0.0.1:$PGPORT/optuna"
}

_pg_stop() {
  local bin
  bin=$(_pg_bin || true)
  if [ -n "$bin" ] && [ -d "$PG_DIR/data" ]; then
    _pg_as_owner "$bin/pg_ctl -D $PG_DIR/data -m fast stop" >/dev/null || true
  fi
}

if [ "${1:-start}" = stop ]; then _pg_stop; else _pg_start; fi
