#!/usr/bin/env bash
# Runs a command with a throwaway redis-server for the tests, then stops it (whatever the
# command's exit status, which this script passes on).
#
#   bash scripts/with-test-redis.sh cargo test --tests
#
# - Installs redis-server with apt-get when it is not on PATH (as root, or through sudo).
# - Starts it on 127.0.0.1:$CHATGUARD_TEST_REDIS_PORT (default 6399) with no persistence
#   (--save '' --appendonly no), daemonized, its pid file and log in a temporary directory.
# - Exports CHATGUARD_TEST_REDIS_URL=redis://127.0.0.1:PORT/ for the command: the Redis tests
#   in tests/behaviour.rs use it and fail (not skip) if it cannot be reached.
set -euo pipefail

PORT="${CHATGUARD_TEST_REDIS_PORT:-6399}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "with-test-redis: redis-server not found, installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

if answers; then
  echo "with-test-redis: 127.0.0.1:$PORT is already in use; set CHATGUARD_TEST_REDIS_PORT" >&2
  exit 1
fi

DIR="$(mktemp -d)"
PIDFILE="$DIR/redis.pid"

stop() {
  if [ -f "$PIDFILE" ]; then
    PID="$(cat "$PIDFILE")"
    kill "$PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.05
    done
  fi
  rm -rf "$DIR"
}
trap stop EXIT

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize yes --pidfile "$PIDFILE" --dir "$DIR" --logfile "$DIR/redis.log"

for _ in $(seq 1 200); do
  answers && break
  sleep 0.05
done
if ! answers; then
  echo "with-test-redis: redis-server did not start on 127.0.0.1:$PORT; its log:" >&2
  cat "$DIR/redis.log" >&2 || true
  exit 1
fi

export CHATGUARD_TEST_REDIS_URL="redis://127.0.0.1:$PORT/"
echo "with-test-redis: redis-server on $CHATGUARD_TEST_REDIS_URL" >&2
"$@"
