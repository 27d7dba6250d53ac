"""Run real vLLM (CPU, SmolLM2-135M-Instruct) for end-to-end tests.

Standard library only. The heavy lifting is in ``deploy/local/``: ``install_vllm.sh`` makes
the venv and the converted model (idempotent, fast when done), ``start_vllm.sh --foreground``
holds the one vLLM command line. This module starts that in its own process group on
127.0.0.1, waits for ``/health`` and kills the whole group on exit, so no vLLM process
outlives the tests::

    ensure_vllm_installed()
    with run_vllm(18000, aliases=["smollm2-small", "smollm2-large"], max_num_seqs=4,
                  log_path=tmp_path / "vllm.log") as base_url:
        ...  # base_url == "http://127.0.0.1:18000"; the OpenAI API is under /v1
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "local"
INSTALL_SCRIPT = DEPLOY_DIR / "install_vllm.sh"
START_SCRIPT = DEPLOY_DIR / "start_vllm.sh"
HOST = "127.0.0.1"

# No proxy for loopback, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class VllmError(RuntimeError):
    """vLLM could not be installed or did not come up."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def ensure_vllm_installed(timeout: float = 1800.0) -> None:
    """Install vLLM and convert the model if needed (returns in well under a second when
    everything is in place; several minutes on a fresh machine)."""
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise VllmError(f"{INSTALL_SCRIPT} did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise VllmError(f"{INSTALL_SCRIPT} failed with exit code {proc.returncode}:\n{tail}")


def health_ok(base_url: str, timeout: float = 2.0) -> bool:
    """True when ``GET {base_url}/health`` answers 200."""
    try:
        with _OPENER.open(f"{base_url}/health", timeout=timeout) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def scrape_gauge(base_url: str, name: str) -> float:
    """Sum of the samples of one metric (e.g. ``vllm:num_requests_running``) over all its
    label sets, read from ``{base_url}/metrics``."""
    with _OPENER.open(f"{base_url}/metrics", timeout=5.0) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the server if the process that started it dies (e.g. pytest is
    SIGKILLed), so a crashed test run does not leave vLLM behind. The signal fires when
    the forking *thread* exits: start servers from the main thread or a long-lived one."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left after ``grace`` s."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    # Members re-parented to init are reaped by it; give them a moment to disappear.
    end = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)


@contextlib.contextmanager
def run_vllm(
    port: int,
    *,
    aliases: Sequence[str],
    max_num_seqs: int | None,
    log_path: Path,
    startup_timeout: float = 180.0,
    stop_grace: float = 15.0,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Start vLLM on 127.0.0.1:``port`` serving the model under every name in ``aliases``;
    yield its base URL (``http://127.0.0.1:PORT``) once ``/health`` answers 200.

    Raises :class:`VllmError` with the log tail if the server exits or is not healthy within
    ``startup_timeout`` seconds. On exit the server's whole process group gets SIGTERM, then
    SIGKILL after ``stop_grace`` seconds.
    """
    if not aliases or any(not a or any(c.isspace() for c in a) for a in aliases):
        raise ValueError(f"aliases must be non-empty names without spaces: {aliases!r}")
    if not _port_free(port):
        raise VllmError(f"port {HOST}:{port} is already in use")
    ensure_vllm_installed()

    base_url = f"http://{HOST}:{port}"
    cmd = [
        "bash",
        str(START_SCRIPT),
        "--foreground",
        "--port",
        str(port),
        "--aliases",
        " ".join(aliases),
    ]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if extra_args:
        cmd += ["--", *extra_args]

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # for PR_SET_PDEATHSIG
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while not health_ok(base_url):
            if proc.poll() is not None:
                raise VllmError(
                    f"vLLM exited with code {proc.returncode} before becoming healthy; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise VllmError(
                    f"vLLM not healthy after {startup_timeout:.0f} s; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield base_url
    finally:
        _stop_group(proc, stop_grace)
