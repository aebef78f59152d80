#!/usr/bin/env bash
# Soak test: build release, start `chatguard serve` with the text and image models on a free
# port (memory backend, snapshot in a temp dir, no Redis), measure capacity with the full mix
# (closed loop), then run examples/loadgen open loop at SOAK_PERCENT % of it for SOAK_SECS,
# print the server's RSS curve and the lost/duplicated counts, and stop the server.
#
#   make soak                               # 10 minutes
#   SOAK_SECS=60 bash scripts/soak.sh       # shorter
#   bash scripts/soak.sh --rate 300         # skip the capacity phase
#
# Env: SOAK_SECS (600), SOAK_PERCENT (80), SOAK_CONNS (8), SOAK_MIX
# (text=55,model=25,image=10,malformed=10), SOAK_CAPACITY_SECS (20), SOAK_WINDOW (16 requests
# in flight per connection while measuring capacity), SOAK_RSS_EVERY (seconds, default
# SOAK_SECS/30, at least 5), SOAK_CONFIG_EXTRA (TOML appended to the server's config, e.g.
# $'[lookup]\nmax_entries = 20000'; not [server], [admin], [auth.tokens], [text_model], [image]
# or [behaviour], which the script writes). Needs `make models`. Exits non-zero when a reply was lost or
# duplicated, a malformed request got no `error`, or the server died.
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECS=${SOAK_SECS:-600}
SOAK_PERCENT=${SOAK_PERCENT:-80}
SOAK_CONNS=${SOAK_CONNS:-8}
SOAK_MIX=${SOAK_MIX:-text=55,model=25,image=10,malformed=10}
SOAK_CAPACITY_SECS=${SOAK_CAPACITY_SECS:-20}
SOAK_WINDOW=${SOAK_WINDOW:-16}
SOAK_RSS_EVERY=${SOAK_RSS_EVERY:-$(( SOAK_SECS / 30 > 5 ? SOAK_SECS / 30 : 5 ))}
RATE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=${2:?--rate needs a number}; shift 2 ;;
    *) echo "soak: unknown argument $1 (only --rate N)" >&2; exit 2 ;;
  esac
done

for f in models/minilm/minilm-l6-v2.onnx models/toxblock/toxblock.onnx \
         models/image/image-safety-classifier-s.onnx models/onnxruntime/libonnxruntime.so.1.31.1; do
  [ -f "$f" ] || { echo "soak: $f is missing: run \`make models\` first" >&2; exit 2; }
done

echo "soak: building (release)"
cargo build --release --bin chatguard --example loadgen

TMP=$(mktemp -d /tmp/chatguard-soak.XXXXXX)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TOKEN="soak-$(date +%s)-$$"
cat > "$TMP/chatguard.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"

[admin]
enabled = false

[auth.tokens]
"$TOKEN" = "soak"

[text_model]
enabled = true

[image]
model_enabled = true

[behaviour]
snapshot_path = "$TMP/behaviour.snapshot"
EOF
printf '%s\n' "${SOAK_CONFIG_EXTRA:-}" >> "$TMP/chatguard.toml"

echo "soak: starting chatguard on 127.0.0.1:$PORT (text + image models), log $TMP/server.log"
./target/release/chatguard serve --config "$TMP/chatguard.toml" > "$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "soak: the server exited during startup:" >&2; tail -20 "$TMP/server.log" >&2; exit 1
  fi
  # The port accepts connections as soon as it is bound; "listening" comes after the models.
  if grep -q "listening" "$TMP/server.log"; then break; fi
  sleep 0.5
done
grep -q "text model loaded" "$TMP/server.log" || { echo "soak: text model not loaded:" >&2; tail -20 "$TMP/server.log" >&2; exit 1; }
grep -q "image model loaded" "$TMP/server.log" || { echo "soak: image model not loaded:" >&2; tail -20 "$TMP/server.log" >&2; exit 1; }

LOADGEN=(./target/release/examples/loadgen --url "ws://127.0.0.1:$PORT/v1/ws" --token "$TOKEN"
         --conns "$SOAK_CONNS" --mix "$SOAK_MIX" --pid "$SERVER_PID")

CAPACITY=""
if [ -z "$RATE" ]; then
  echo "soak: measuring capacity: closed loop, $SOAK_WINDOW in flight x $SOAK_CONNS conns, ${SOAK_CAPACITY_SECS}s, mix $SOAK_MIX"
  "${LOADGEN[@]}" --closed "$SOAK_WINDOW" --duration "$SOAK_CAPACITY_SECS" --rss-every 5 | tee "$TMP/capacity.txt"
  CAPACITY=$(sed -n 's/^RESULT .*msgs_per_s=\([0-9.]*\).*/\1/p' "$TMP/capacity.txt")
  [ -n "$CAPACITY" ] || { echo "soak: could not measure capacity" >&2; exit 1; }
  RATE=$(python3 -c "print(max(1, int($CAPACITY * $SOAK_PERCENT / 100)))")
  echo "soak: capacity $CAPACITY msgs/s -> soak rate $RATE msgs/s ($SOAK_PERCENT %)"
fi

echo "soak: open loop at $RATE msgs/s for ${SOAK_SECS}s, RSS every ${SOAK_RSS_EVERY}s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
set +e
"${LOADGEN[@]}" --rate "$RATE" --duration "$SOAK_SECS" --rss-every "$SOAK_RSS_EVERY" --grace 30 | tee "$TMP/soak.txt"
RC=${PIPESTATUS[0]}
set -e
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "soak: the server died during the soak:" >&2; tail -20 "$TMP/server.log" >&2; RC=1
fi

echo
echo "soak summary: capacity ${CAPACITY:-not measured (--rate given)} msgs/s, rate $RATE msgs/s, ${SOAK_SECS}s, load average now $(cut -d' ' -f1-3 /proc/loadavg)"
grep '^RESULT' "$TMP/soak.txt" || true
grep -E '^(LOST|replies|degraded|errors):' "$TMP/soak.txt" || true
if [ "$RC" -eq 0 ]; then echo "soak: PASSED"; else echo "soak: FAILED (rc $RC)"; fi
exit "$RC"
