#!/usr/bin/env bash
# Start a throw-away Redis server on 127.0.0.1 for the rate-limit tests and print its URL.
#
#   export TENANTLORA_TEST_REDIS_URL="$(bash .ci/redis.sh)"
#
# Installs redis-server from Debian's packages when it is missing (needs root, as CI is), runs a
# private instance (not the distribution's service) under $REDIS_ROOT, listening on loopback only,
# without persistence. Idempotent: a second call finds the server answering and prints the same
# URL. Everything but the URL goes to stderr. Stop it with `.ci/redis.sh stop`.
set -euo pipefail

REDIS_ROOT=${TENANTLORA_REDIS_ROOT:-/tmp/tenantlora-redis}
REDIS_PORT=${TENANTLORA_REDIS_PORT:-56379}
URL="redis://127.0.0.1:$REDIS_PORT/0"

log() { echo "redis.sh: $*" >&2; }

if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends redis-server >&2
fi

if [ "${1:-}" = stop ]; then
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >&2 2>/dev/null || true
  exit 0
fi

if [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" != PONG ]; then
  mkdir -p "$REDIS_ROOT"
  log "starting on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_ROOT" \
    --daemonize yes --pidfile "$REDIS_ROOT/redis.pid" --logfile "$REDIS_ROOT/server.log" \
    --save "" --appendonly no >&2
  for _ in $(seq 1 50); do
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
fi

# Prove the URL works before handing it out.
[ "$(redis-cli -u "$URL" ping)" = PONG ]
log "ready: $URL"
echo "$URL"
