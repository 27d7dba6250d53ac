#!/usr/bin/env bash
# The whole local stack on loopback, from a fresh machine: installs what is
# needed, starts Redis, PostgreSQL (the usage ledger; its schema migrated),
# real vLLM on CPU (SmolLM2-135M under two aliases, one per tier) and the
# gateway, then sends a demo request through the openai SDK and prints the
# answer and the response headers. Re-running reuses what is already running.
# Stop everything with deploy/local/down.sh.
#
# Env: TOLLWAY_HOME (cache and data, default ~/.cache/tollway), TOLLWAY_PORT
# (gateway, 8080), TOLLWAY_VLLM_PORT (8000), TOLLWAY_REDIS_PORT (6379),
# TOLLWAY_PG_PORT (5432), TOLLWAY_API_KEY.
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
# The ledger's database: a cluster of our own, its data in $PG_HOME/data.
PG_PORT="${TOLLWAY_PG_PORT:-5432}"
PG_HOME="$TOLLWAY_HOME/pg"
PG_BIN=/usr/lib/postgresql/15/bin
export TOLLWAY_DATABASE_URL="postgresql://tollway@127.0.0.1:$PG_PORT/tollway"
# Rows wait here on disk until PostgreSQL has them (one directory per gateway process).
export TOLLWAY_SPOOL_DIR="$TOLLWAY_HOME/spool"

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

echo "== postgresql on 127.0.0.1:$PG_PORT (data in $PG_HOME)"
# PostgreSQL refuses to run as root: as root the cluster belongs to the postgres user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}
pg_sql() {  # as the cluster's superuser, over loopback (trust), never prompting
    PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -w -qAt -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$PG_PORT" -U postgres -d postgres -c "$1"
}
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$TOLLWAY_HOME"
    # postgres must be able to reach $PG_HOME; a home like /root (0700) lets no one
    # through, so grant it passage (search only, by ACL) on each directory that blocks it.
    path=""
    IFS=/ read -ra parts <<< "$TOLLWAY_HOME"
    for part in "${parts[@]}"; do
        [ -n "$part" ] || continue
        path="$path/$part"
        runuser -u postgres -- test -x "$path" 2>/dev/null || setfacl -m u:postgres:x "$path"
    done
    install -d -o postgres -g postgres -m 700 "$PG_HOME"
else
    install -d -m 700 "$PG_HOME"
fi
if [ ! -f "$PG_HOME/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$PG_HOME/data" -U postgres -A trust -E UTF8 \
        --locale=C.UTF-8 --no-instructions >"$RUN/initdb.log"
    # Loopback only, socket beside the data: nothing of Debian's own cluster is shared.
    # fsync stays on: this cluster is the ledger finance bills from.
    printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" "$PG_HOME" \
        | as_pg tee -a "$PG_HOME/data/postgresql.conf" >/dev/null
fi
if as_pg "$PG_BIN/pg_ctl" -D "$PG_HOME/data" status >/dev/null 2>&1; then
    running_port="$(sed -n 4p "$PG_HOME/data/postmaster.pid")"  # line 4: its port
    if [ "$running_port" != "$PG_PORT" ]; then
        echo "this cluster already runs on port $running_port: run down.sh first" >&2
        exit 1
    fi
    echo "reusing the running cluster"
elif "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    echo "port $PG_PORT is another PostgreSQL's (Debian's own? pg_lsclusters);" \
        "stop it or set TOLLWAY_PG_PORT" >&2
    exit 1
else
    as_pg "$PG_BIN/pg_ctl" -D "$PG_HOME/data" -o "-p $PG_PORT" -l "$PG_HOME/postgres.log" \
        -w -t 60 start >/dev/null || { tail -20 "$PG_HOME/postgres.log"; exit 1; }
fi
if [ -z "$(pg_sql "SELECT 1 FROM pg_roles WHERE rolname = 'tollway'")" ]; then
    pg_sql "CREATE ROLE tollway LOGIN"
fi
if [ -z "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = 'tollway'")" ]; then
    pg_sql "CREATE DATABASE tollway OWNER tollway"
fi
mkdir -p "$TOLLWAY_SPOOL_DIR"
echo "== ledger schema (tollway db migrate)"
.venv/bin/tollway db migrate --config deploy/local/tollway.yaml

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
echo "stack is up: gateway $GATEWAY/v1 (key \$TOLLWAY_API_KEY), ledger $TOLLWAY_DATABASE_URL,"
echo "logs in $RUN and $PG_HOME/postgres.log; stop: deploy/local/down.sh"
