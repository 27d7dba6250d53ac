#!/usr/bin/env bash
# Stops what deploy/local/up.sh started: the gateway, vLLM, Redis and PostgreSQL.
# The gateway goes first and is waited for, so that it hands the rows still in its
# spool to PostgreSQL before the database stops (rows left over wait in
# $TOLLWAY_HOME/spool for the next start either way).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOLLWAY_HOME="${TOLLWAY_HOME:-$HOME/.cache/tollway}"
RUN="$TOLLWAY_HOME/run"
PG_DATA="$TOLLWAY_HOME/pg/data"
PG_BIN=/usr/lib/postgresql/15/bin

if [ -f "$RUN/gateway.pid" ]; then
    pid="$(cat "$RUN/gateway.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    stopped=""
    for _ in $(seq 150); do  # its drain (25 s) and the last spool flush
        state="$(ps -o stat= -p "$pid" 2>/dev/null)"  # gone, or a zombie nobody reaps
        if [ -z "$state" ] || [ "${state:0:1}" = Z ]; then stopped=1; break; fi
        sleep 0.2
    done
    if [ -z "$stopped" ]; then
        # its spool is fsync'd: what it had not written is written by its next start
        echo "gateway still running after 30 s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$RUN/gateway.pid" && echo "gateway stopped"
fi
bash "$ROOT/deploy/local/start_vllm.sh" --port "${TOLLWAY_VLLM_PORT:-8000}" --stop || true
if [ -f "$RUN/redis.pid" ]; then
    kill -TERM "$(cat "$RUN/redis.pid")" 2>/dev/null && echo "redis stopped"
    rm -f "$RUN/redis.pid"
fi
if [ -f "$PG_DATA/postmaster.pid" ]; then
    # fast: disconnect clients, write a checkpoint, stop (as postgres when root)
    if [ "$(id -u)" = 0 ]; then
        (cd / && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop) >/dev/null
    else
        "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    fi && echo "postgresql stopped"
fi
