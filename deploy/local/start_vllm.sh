#!/usr/bin/env bash
# Starts real vLLM (CPU) serving SmolLM2-135M-Instruct on 127.0.0.1 under several model
# aliases, so that two gateway tiers can share one CPU process. Installs vLLM and converts
# the model first if needed (deploy/local/install_vllm.sh).
#
#   start_vllm.sh [options] [-- extra vLLM args]
#     --port N            port on 127.0.0.1 (env TOLLWAY_VLLM_PORT, default 8000)
#     --aliases "A B"     served model names (env TOLLWAY_VLLM_ALIASES,
#                         default "smollm2-small smollm2-large")
#     --max-num-seqs N    batch slots (env TOLLWAY_VLLM_MAX_NUM_SEQS, default: vLLM's)
#     --log FILE          log file (env TOLLWAY_VLLM_LOG, default $TOLLWAY_HOME/run/vllm-PORT.log)
#     --pid-file FILE     pid file (env TOLLWAY_VLLM_PID, default $TOLLWAY_HOME/run/vllm-PORT.pid)
#     --wait              block until /health answers 200 (env TOLLWAY_VLLM_WAIT=1)
#     --timeout S         how long --wait waits (env TOLLWAY_VLLM_TIMEOUT, default 300)
#     --dtype D           weights dtype (env TOLLWAY_VLLM_DTYPE; default: bfloat16 on CPUs with
#                         AVX-512, float32 on AVX2-only CPUs, where bf16 is ~2x slower)
#     --foreground        exec vLLM in the foreground (no pid file, logs to stdout/stderr)
#     --stop              stop the server of this port/pid file (SIGTERM its process group,
#                         SIGKILL after 20 s)
#     --status            say whether it runs and answers /health
#
# The server runs in its own session/process group (setsid), whose id is the pid in the
# pid file; --stop signals the whole group, so the engine-core child goes too.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOLLWAY_HOME="${TOLLWAY_HOME:-$HOME/.cache/tollway}"
VENV="$TOLLWAY_HOME/vllm-venv"
MODEL_DIR="$TOLLWAY_HOME/models/smollm2-135m-instruct"
HOST=127.0.0.1   # never anything else

port="${TOLLWAY_VLLM_PORT:-8000}"
aliases="${TOLLWAY_VLLM_ALIASES:-smollm2-small smollm2-large}"
max_num_seqs="${TOLLWAY_VLLM_MAX_NUM_SEQS:-}"
dtype="${TOLLWAY_VLLM_DTYPE:-}"
log_file="${TOLLWAY_VLLM_LOG:-}"
pid_file="${TOLLWAY_VLLM_PID:-}"
wait_ready="${TOLLWAY_VLLM_WAIT:-0}"
timeout="${TOLLWAY_VLLM_TIMEOUT:-300}"
mode=start
extra=()

while (($#)); do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --aliases) aliases="$2"; shift 2 ;;
        --max-num-seqs) max_num_seqs="$2"; shift 2 ;;
        --dtype) dtype="$2"; shift 2 ;;
        --log) log_file="$2"; shift 2 ;;
        --pid-file) pid_file="$2"; shift 2 ;;
        --wait) wait_ready=1; shift ;;
        --timeout) timeout="$2"; shift 2 ;;
        --foreground) mode=foreground; shift ;;
        --stop) mode=stop; shift ;;
        --status) mode=status; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "start_vllm: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

[[ "$port" =~ ^[0-9]+$ ]] || { echo "start_vllm: bad port: $port" >&2; exit 2; }
run_dir="$TOLLWAY_HOME/run"
log_file="${log_file:-$run_dir/vllm-$port.log}"
pid_file="${pid_file:-$run_dir/vllm-$port.pid}"
url="http://$HOST:$port"

log() { echo "start_vllm: $*"; }
healthy() { curl -fsS -o /dev/null --max-time 2 "$url/health" 2>/dev/null; }
# Alive and really our server (guards against a stale pid file whose pid was reused).
alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "vllm.entrypoints.openai.api_server.* --port $port "
}
read_pid() { cat "$pid_file" 2>/dev/null || true; }

stop_server() {
    local pid
    pid="$(read_pid)"
    if ! alive "$pid"; then
        log "not running (pid file $pid_file)"
        rm -f "$pid_file"
        return 0
    fi
    log "stopping process group $pid"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        # The group is gone when no process has it as its pgid any more.
        pgrep -g "$pid" >/dev/null 2>&1 || break
        sleep 0.5
    done
    if pgrep -g "$pid" >/dev/null 2>&1; then
        log "still running after 20 s, SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
    log "stopped"
}

case "$mode" in
    stop) stop_server; exit 0 ;;
    status)
        pid="$(read_pid)"
        if alive "$pid"; then
            if healthy; then log "running (pid $pid), $url/health OK"; else log "running (pid $pid), not healthy yet"; fi
            exit 0
        fi
        log "not running"; exit 1 ;;
esac

"$HERE/install_vllm.sh"

if [ -z "$dtype" ]; then
    # The converted weights are bf16. Without AVX-512, oneDNN has no bf16 matmul here and
    # vLLM falls back to a slow path: measured 21 tok/s (bf16) vs 43 tok/s (fp32) for 4
    # concurrent streams on a 2-core AVX2 machine.
    if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then dtype=bfloat16; else dtype=float32; fi
fi

read -r -a alias_list <<<"$aliases"
((${#alias_list[@]})) || { echo "start_vllm: no model aliases given" >&2; exit 2; }

args=(-m vllm.entrypoints.openai.api_server
      --model "$MODEL_DIR"
      --served-model-name "${alias_list[@]}"
      --host "$HOST" --port "$port"
      --max-model-len 2048 --enforce-eager
      --dtype "$dtype")
[ -n "$max_num_seqs" ] && args+=(--max-num-seqs "$max_num_seqs")
args+=("${extra[@]}")

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$TOLLWAY_HOME/vllm-cache}"

if [ "$mode" = foreground ]; then
    log "exec python ${args[*]}"
    exec "$VENV/bin/python" "${args[@]}"
fi

pid="$(read_pid)"
if alive "$pid"; then
    log "already running (pid $pid, pid file $pid_file)"
else
    if healthy; then
        echo "start_vllm: something else already answers on $url (no live pid in $pid_file)" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$log_file")" "$(dirname "$pid_file")"
    log "starting vLLM on $url as [$aliases] dtype=$dtype${max_num_seqs:+ max-num-seqs=$max_num_seqs}, log $log_file"
    # setsid: own session and process group (pgid = this pid), detached from our terminal.
    setsid "$VENV/bin/python" "${args[@]}" >>"$log_file" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$pid_file"
    log "pid $pid (pid file $pid_file); stop with: $0 --port $port --stop"
fi

if [ "$wait_ready" = 1 ]; then
    t0=$SECONDS
    until healthy; do
        if ! alive "$pid"; then
            echo "start_vllm: vLLM exited before becoming healthy; last log lines:" >&2
            tail -n 40 "$log_file" >&2
            rm -f "$pid_file"
            exit 1
        fi
        if ((SECONDS - t0 >= timeout)); then
            echo "start_vllm: not healthy after ${timeout} s; last log lines:" >&2
            tail -n 40 "$log_file" >&2
            stop_server >&2
            exit 1
        fi
        sleep 1
    done
    log "healthy at $url after $((SECONDS - t0)) s"
fi
