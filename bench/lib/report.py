"""What a benchmark prints and records: Markdown tables, machine facts, the commit, RESULTS.md.

``bench/RESULTS.md`` is the current results page: an introduction, then one
section per benchmark (``## overhead``, ``## cachehit``, ...) holding its latest
recorded run. ``record`` replaces the section of the benchmark that ran, or adds
it at the end if that benchmark has none yet; every other section and the
introduction stay as they were. Earlier runs are in git's history of the file.
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
HEADING = "## "
FENCE = "```"


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


def git_commit(root: Path = REPO) -> str:
    """``root``'s short commit, marked dirty if tracked files were modified."""
    head = run_quiet(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    status = run_quiet(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
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
    wrk_version: list[str] = []
    with contextlib.suppress(OSError):  # no wrk: a benchmark that does not use it
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
    benchmark: str,
    what: str,
    started: dt.datetime,
    command: str,
    machine_extra: Sequence[str] = (),
) -> list[str]:
    """The lines every section starts with: the benchmark's heading, what it measures,
    then the date, command, commit and machine of the run."""
    return [
        f"{HEADING}{benchmark}",
        "",
        what,
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        f"- commit: {git_commit()}",
        machine_line(machine_extra),
    ]


def section_name(section: str) -> str:
    """The benchmark a section belongs to: its first line, ``## NAME``."""
    first = section.split("\n", 1)[0]
    if not first.startswith(HEADING) or not first[len(HEADING) :].strip():
        raise BenchError(f"a section must start with '{HEADING}NAME', not {first!r}")
    return first[len(HEADING) :].strip()


def split_page(page: str) -> tuple[str, list[tuple[str, str]]]:
    """The introduction, then (name, text) per section in page order.

    A section runs from its ``## NAME`` line to the next one; a line in a code
    block (a profile) is never a heading. Each text keeps its own lines exactly.
    """
    intro: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    in_code = False
    for line in page.splitlines(keepends=True):
        if line.startswith(FENCE):
            in_code = not in_code
        if not in_code and line.startswith(HEADING):
            sections.append((line[len(HEADING) :].strip(), []))
        (sections[-1][1] if sections else intro).append(line)
    return "".join(intro), [(name, "".join(lines)) for name, lines in sections]


def replace_section(page: str, section: str) -> tuple[str, bool]:
    """``page`` with ``section`` in place of its benchmark's section; True if it replaced one.

    A benchmark without a section yet gets one at the end. The other sections,
    their order and the introduction keep their text; only the blank lines
    between sections are made one.
    """
    name = section_name(section)
    body = section.strip("\n") + "\n"
    intro, sections = split_page(page)
    replaced = False
    texts = []
    for other, text in sections:
        if other == name:
            texts.append(body)
            replaced = True
        else:
            texts.append(text)
    if not replaced:
        texts.append(body)
    parts = [intro] if intro.strip() else []
    parts += texts
    return "\n".join(part.strip("\n") + "\n" for part in parts), replaced


def record(section: str, results: Path = RESULTS) -> bool:
    """Put ``section`` in RESULTS.md in place of its benchmark's; True if it replaced one."""
    if not results.exists():
        raise BenchError(f"{results} is missing; it holds the introduction that explains the page")
    page, replaced = replace_section(results.read_text(), section)
    results.write_text(page)
    return replaced


def publish(
    *,
    result: str,
    notes: Sequence[str],
    head: Sequence[str],
    pinning: str | None = None,
    runs_detail: str | None = None,
    profile_text: str | None = None,
    no_record: bool = False,
) -> None:
    """Print a benchmark's table and notes; unless ``no_record``, make them its RESULTS.md section.

    ``head`` is ``section_head(...)``; ``runs_detail`` (one line per run) is printed
    only: the page keeps the figures, the run's output its rounds. A profile, when there
    is one, follows as a code block.
    """
    print()
    print(result)
    print()
    for note in notes:
        print(f"- {note}")
    if runs_detail:
        print()
        print(runs_detail)
    if profile_text:
        print()
        print(profile_text)
    if no_record:
        return
    lines = [*head]
    if pinning:
        lines.append(f"- pinning: {pinning}")
    lines += [*(f"- {note}" for note in notes), "", result, ""]
    section = "\n".join(lines)
    if profile_text:
        section += "\n```\n" + profile_text + "\n```\n"
    replaced = record(section)
    print(
        f"\n{'replaced' if replaced else 'added'} the {section_name(section)} section of {RESULTS}"
    )
