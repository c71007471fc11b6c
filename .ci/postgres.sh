#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the registry tests and print its URL.
#
#   export TENANTLORA_TEST_POSTGRES_URL="$(bash .ci/postgres.sh)"
#
# Installs PostgreSQL from Debian's packages when it is missing (needs root, as CI is), creates
# a private cluster under $PGROOT (not the distribution's `main` cluster), listens on loopback
# only, and creates a user and a database. Idempotent: a second call finds the server running and
# prints the same URL. Everything but the URL goes to stderr. Stop it with `.ci/postgres.sh stop`.
set -euo pipefail

PGROOT=${TENANTLORA_PG_ROOT:-/tmp/tenantlora-postgres}
PGPORT=${TENANTLORA_PG_PORT:-55432}
PGUSER_NAME=${TENANTLORA_PG_USER:-tenantlora}
PGPASS=${TENANTLORA_PG_PASSWORD:-tenantlora}
PGDB=${TENANTLORA_PG_DB:-tenantlora}
RUN_AS=postgres

log() { echo "postgres.sh: $*" >&2; }

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$dir" ] && [ -x "$dir/postgres" ] && echo "$dir"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$RUN_AS" -- "$@"
  else
    "$@"  # not root: run as ourselves (the cluster then belongs to this user)
  fi
}

BIN=$(pg_bindir || true)
if [ -z "$BIN" ]; then
  log "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # postgresql-common would create and start the distribution's own cluster; we run our own.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/tenantlora.conf
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BIN=$(pg_bindir)
fi
[ "$(id -u)" = 0 ] || RUN_AS=$(id -un)

if [ "${1:-}" = stop ]; then
  as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -m fast stop >&2 || true
  exit 0
fi

mkdir -p "$PGROOT"
[ "$(id -u)" = 0 ] && chown "$RUN_AS" "$PGROOT"
if [ ! -f "$PGROOT/data/PG_VERSION" ]; then
  log "initdb in $PGROOT/data"
  as_pg "$BIN/initdb" -D "$PGROOT/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >&2
fi

if ! as_pg "$BIN/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1; then
  log "starting on 127.0.0.1:$PGPORT"
  as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGROOT -c fsync=off -c max_connections=200" >&2
fi

psql_admin() { as_pg "$BIN/psql" -h "$PGROOT" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$PGUSER_NAME'")" != 1 ]; then
  psql_admin -d postgres -c "CREATE ROLE $PGUSER_NAME LOGIN PASSWORD '$PGPASS'" >&2
fi
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PGDB'")" != 1 ]; then
  psql_admin -d postgres -c "CREATE DATABASE $PGDB OWNER $PGUSER_NAME" >&2
fi

URL="postgresql://$PGUSER_NAME:$PGPASS@127.0.0.1:$PGPORT/$PGDB"
# Prove the URL works over TCP with the password before handing it out.
PGPASSWORD=$PGPASS "$BIN/psql" "$URL" -qtA -c "SELECT 1" >/dev/null
log "ready: $URL"
echo "$URL"
