"""What a benchmark prints and records: Markdown tables, machine facts, the commit, RESULTS.md.

``bench/RESULTS.md`` is an append-only log; ``record`` adds one section at the
end and refuses to create the file (its header explains the log).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.lib import REPO, BenchError
from bench.lib.procs import run_quiet

RESULTS = REPO / "bench" / "RESULTS.md"


def ms(us: float | None, signed: bool = False) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:+.3f}" if signed else f"{us / 1000:.3f}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]) -> str:
    """``columns`` are (title, "l" or "r"); every row has one cell per column."""
    lines = [
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "|".join("---:" if align == "r" else "---" for _, align in columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def git_commit() -> str:
    head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    status = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    changed = [ln for ln in status.stdout.splitlines() if ln.strip()]
    suffix = f" (dirty: {len(changed)} tracked files modified)" if changed else ""
    return head.stdout.strip() + suffix


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = run_quiet(["wrk", "-v"]).stdout.splitlines()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "wrk": wrk_version[0].split(" Copyright")[0] if wrk_version else "unknown",
    }


def machine_line(extra: Sequence[str] = ()) -> str:
    facts = machine_facts()
    parts = [
        f"nproc {facts['nproc']}",
        facts["cpu"],
        facts["kernel"],
        f"Python {facts['python']}",
        facts["wrk"],
        *extra,
    ]
    return "- machine: " + ", ".join(parts)


def command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), *sys.argv])


def section_head(
    title: str, started: dt.datetime, command: str, machine_extra: Sequence[str] = ()
) -> list[str]:
    """The lines every recorded section starts with: title, command, commit, machine."""
    return [
        f"## {started:%Y-%m-%d %H:%M} UTC: {title}",
        "",
        f"- command: `{command}`",
        f"- commit: {git_commit()}",
        machine_line(machine_extra),
    ]


def record(section: str) -> None:
    """Append ``section`` to RESULTS.md, after a blank line."""
    if not RESULTS.exists():
        raise BenchError(f"{RESULTS} is missing; it holds the header that explains the log")
    with RESULTS.open("a") as out:
        out.write("\n" + section)


def publish(
    *,
    result: str,
    notes: Sequence[str],
    head: Sequence[str],
    pinning: str,
    runs_detail: str,
    profile_text: str | None = None,
    no_record: bool = False,
) -> None:
    """Print a benchmark's table and notes; unless ``no_record``, append them to RESULTS.md.

    ``head`` is ``section_head(...)``; ``runs_detail`` (one line per run) goes in a
    collapsed block; a profile, when there is one, follows as a code block.
    """
    print()
    print(result)
    print()
    for note in notes:
        print(f"- {note}")
    if profile_text:
        print()
        print(profile_text)
    if no_record:
        return
    lines = [*head, f"- pinning: {pinning}", *(f"- {note}" for note in notes), "", result, ""]
    lines += ["<details><summary>individual runs</summary>", "", runs_detail, "", "</details>", ""]
    section = "\n".join(lines)
    if profile_text:
        section += "\n```\n" + profile_text + "\n```\n"
    record(section)
    print(f"\nappended to {RESULTS}")
