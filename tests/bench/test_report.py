"""bench/lib/report: a run replaces its benchmark's section of RESULTS.md and leaves the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib import BenchError
from bench.lib.report import record, replace_section, section_name, split_page

INTRO = "# Benchmark results\n\nThe current figures; git keeps the earlier runs.\n"
OVERHEAD = "## overhead\n\n- date: 2026-01-01 00:00 UTC\n\n| a |\n|---|\n| 1 |\n"
CACHEHIT = "## cachehit\n\n- date: 2026-01-02 00:00 UTC\n\n```\nprofile\n## not a heading\n```\n"
ROUTING = "## routing\n\n- date: 2026-01-03 00:00 UTC\n"
PAGE = "\n".join([INTRO, OVERHEAD, CACHEHIT, ROUTING])


def test_the_page_splits_into_its_intro_and_one_section_per_benchmark() -> None:
    intro, sections = split_page(PAGE)
    assert intro.strip() == INTRO.strip()
    assert [name for name, _ in sections] == ["overhead", "cachehit", "routing"]
    assert sections[1][1].strip() == CACHEHIT.strip()  # "## " in a code block is not a heading


def test_replacing_a_section_leaves_the_others_and_the_intro_intact() -> None:
    new = "## cachehit\n\n- date: 2026-02-01 00:00 UTC\n\nnew figures\n"
    page, replaced = replace_section(PAGE, new)
    assert replaced
    assert page == "\n".join([INTRO, OVERHEAD, new, ROUTING])
    assert "2026-01-02" not in page
    assert page.count("## cachehit") == 1


def test_a_new_benchmark_gets_its_section_at_the_end() -> None:
    new = "## cachesize\n\nfigures\n"
    page, replaced = replace_section(PAGE, new)
    assert not replaced
    assert page == "\n".join([INTRO, OVERHEAD, CACHEHIT, ROUTING, new])


def test_replacing_twice_gives_the_same_page() -> None:
    new = "## overhead\n\nnewer\n\n"
    once, _ = replace_section(PAGE, new)
    twice, replaced = replace_section(once, new)
    assert replaced
    assert twice == once


def test_a_section_must_start_with_its_heading() -> None:
    assert section_name("## overload\n\nx\n") == "overload"
    with pytest.raises(BenchError):
        section_name("overload\n")
    with pytest.raises(BenchError):
        section_name("## \n")


def test_record_rewrites_the_file_and_refuses_to_create_it(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    with pytest.raises(BenchError):
        record(ROUTING, results)
    results.write_text(PAGE)
    assert record("## routing\n\nnew\n", results)
    assert results.read_text() == "\n".join([INTRO, OVERHEAD, CACHEHIT, "## routing\n\nnew\n"])
