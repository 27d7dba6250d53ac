#!/usr/bin/env bash
# Installs what tollway needs on a fresh Debian 12 machine, idempotently:
# apt packages (redis-server, postgresql for the usage ledger and acl to let its
# server user reach the local stack's data dir, prometheus for promtool and the
# live scrape tests, nginx for the shipped proxy config's test, and any named
# in TOLLWAY_APT_EXTRA) and the
# project's virtualenv in .venv with the package installed editable.
# Re-running is cheap: each step is skipped when its stamp is current.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
APT_PACKAGES="redis-server postgresql acl curl prometheus nginx ${TOLLWAY_APT_EXTRA:-}"

need_apt=()
for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    echo "bootstrap: apt-get install ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian starts the packaged services; tollway's tests start their own on loopback.
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
    # Debian also makes and starts a cluster "15 main" on port 5432; tollway's local
    # stack and tests run their own clusters. Without systemd the package starts it
    # through its init script: stop it, and mark it manual so a reboot does not start it.
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
    if [ -f /etc/postgresql/15/main/start.conf ]; then
        echo manual | $SUDO tee /etc/postgresql/15/main/start.conf >/dev/null
        if pg_lsclusters -h 2>/dev/null | grep -q '^15 *main .* online'; then
            $SUDO pg_ctlcluster 15 main stop || true
        fi
    fi
fi

stamp="$VENV/.tollway-stamp"
# Rebuilt when the package's dependencies change.
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: creating $VENV"
    python3.11 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    echo "$want" > "$stamp"
fi
