#!/usr/bin/env bash
# The whole local stack on loopback, from a fresh machine: installs what is
# needed, starts Redis, real vLLM on CPU (SmolLM2-135M under two aliases, one
# per tier) and the gateway, then sends a demo request through the openai SDK
# and prints the answer and the response headers. Re-running reuses what is
# already running. Stop everything with deploy/local/down.sh.
#
# Env: TOLLWAY_HOME (cache, default ~/.cache/tollway), TOLLWAY_PORT (gateway,
# 8080), TOLLWAY_VLLM_PORT (8000), TOLLWAY_REDIS_PORT (6379), TOLLWAY_API_KEY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export TOLLWAY_HOME="${TOLLWAY_HOME:-$HOME/.cache/tollway}"
RUN="$TOLLWAY_HOME/run"
mkdir -p "$RUN"
export TOLLWAY_PORT="${TOLLWAY_PORT:-8080}"
export TOLLWAY_VLLM_PORT="${TOLLWAY_VLLM_PORT:-8000}"
REDIS_PORT="${TOLLWAY_REDIS_PORT:-6379}"
export TOLLWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export TOLLWAY_VLLM_URL="http://127.0.0.1:$TOLLWAY_VLLM_PORT"
export TOLLWAY_API_KEY="${TOLLWAY_API_KEY:-sk-tollway-local-demo}"
GATEWAY="http://127.0.0.1:$TOLLWAY_PORT"

echo "== installing (skipped where already done)"
bash scripts/bootstrap.sh
bash deploy/local/install_vllm.sh

echo "== redis on 127.0.0.1:$REDIS_PORT"
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
        --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log" --save "" --appendonly no
    for _ in $(seq 50); do
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

echo "== vLLM on $TOLLWAY_VLLM_URL (first start takes ~30-60 s)"
bash deploy/local/start_vllm.sh --port "$TOLLWAY_VLLM_PORT" --max-num-seqs 8 --wait

echo "== gateway on $GATEWAY"
if ! curl -sf "$GATEWAY/health" >/dev/null 2>&1; then
    .venv/bin/tollway check-config deploy/local/tollway.yaml >/dev/null
    setsid .venv/bin/tollway serve --config deploy/local/tollway.yaml \
        >"$RUN/gateway.log" 2>&1 < /dev/null &
    echo $! > "$RUN/gateway.pid"
fi
for _ in $(seq 300); do
    curl -sf "$GATEWAY/ready" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -sf "$GATEWAY/ready" >/dev/null || { echo "gateway not ready; log:"; tail -30 "$RUN/gateway.log"; exit 1; }

echo "== demo request through the openai SDK"
.venv/bin/python deploy/local/demo.py --base-url "$GATEWAY/v1" --api-key "$TOLLWAY_API_KEY"
echo
echo "stack is up: gateway $GATEWAY/v1 (key \$TOLLWAY_API_KEY), logs in $RUN; stop: deploy/local/down.sh"
