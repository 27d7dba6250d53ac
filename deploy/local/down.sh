#!/usr/bin/env bash
# Stops what deploy/local/up.sh started: the gateway, vLLM and Redis.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOLLWAY_HOME="${TOLLWAY_HOME:-$HOME/.cache/tollway}"
RUN="$TOLLWAY_HOME/run"

if [ -f "$RUN/gateway.pid" ]; then
    kill -TERM -- "-$(cat "$RUN/gateway.pid")" 2>/dev/null || kill -TERM "$(cat "$RUN/gateway.pid")" 2>/dev/null
    rm -f "$RUN/gateway.pid" && echo "gateway stopped"
fi
bash "$ROOT/deploy/local/start_vllm.sh" --port "${TOLLWAY_VLLM_PORT:-8000}" --stop || true
if [ -f "$RUN/redis.pid" ]; then
    kill -TERM "$(cat "$RUN/redis.pid")" 2>/dev/null && echo "redis stopped"
    rm -f "$RUN/redis.pid"
fi
