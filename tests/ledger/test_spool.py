"""The on-disk spool: rows survive a crash at any point, in order, and the size bound holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.spool import MAGIC, Spool, SpoolLocked

_open: list[Spool] = []


@pytest.fixture(autouse=True)
def _close_spools() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def opened(directory: Path, **kwargs: int) -> Spool:
    spool = Spool(directory, max_bytes=kwargs.pop("max_bytes", 1 << 20), **kwargs)
    spool.open()
    _open.append(spool)
    return spool


def payloads(start: int, count: int) -> list[bytes]:
    return [f"row-{i:06d}".encode() * (1 + i % 3) for i in range(start, start + count)]


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while True:
        records, end = spool.read(batch)
        if not records:
            return out
        out += records
        spool.ack(end, len(records))


def test_rows_come_back_in_order_across_segments_and_acked_segments_go(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=200)
    for start in range(0, 60, 10):
        assert spool.append(payloads(start, 10)) == 10
    assert spool.pending == 60
    assert len(list(tmp_path.glob("*.seg"))) > 3
    assert drain(spool) == payloads(0, 60)
    assert spool.pending == 0
    assert spool.pending_bytes == 0
    assert len(list(tmp_path.glob("*.seg"))) == 1  # only the one being written


def test_a_restart_reads_from_the_cursor_not_from_the_start(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=300)
    spool.append(payloads(0, 40))
    records, end = spool.read(15)
    spool.ack(end, len(records))
    records, _ = spool.read(5)  # read, never acknowledged: the crash came first
    spool.close()
    again = opened(tmp_path, segment_bytes=300)
    assert again.pending == 25
    assert drain(again) == payloads(15, 25)


def test_a_torn_tail_is_cut_and_everything_before_it_kept(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append(payloads(0, 5))
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    with open(segment, "ab") as file:  # half a record: the process died mid-write
        file.write(b"\x40\x00\x00\x00\x12\x34")
    size = segment.stat().st_size
    again = opened(tmp_path)
    assert segment.stat().st_size == size - 6
    assert again.pending == 5
    again.append(payloads(5, 2))
    assert drain(again) == payloads(0, 7)


def test_a_flipped_byte_in_the_last_record_drops_only_that_record(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append(payloads(0, 3))
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert drain(opened(tmp_path)) == payloads(0, 2)


def test_a_full_spool_keeps_what_fits_and_says_so(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=100)
    rows = [b"x" * 20] * 10  # 28 bytes each with its header
    assert spool.append(rows) == 3
    assert spool.append(rows) == 0
    _, end = spool.read(2)
    spool.ack(end, 2)
    assert spool.append(rows) == 2  # acknowledged rows make room again
    assert spool.pending == 3


def test_one_process_owns_a_spool(tmp_path: Path) -> None:
    first = opened(tmp_path)
    with pytest.raises(SpoolLocked, match=r"its own ledger\.spool_dir"):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()


def test_a_segment_torn_while_being_created_is_recovered(tmp_path: Path) -> None:
    (tmp_path / "000000000001.seg").write_bytes(MAGIC[:5])
    spool = opened(tmp_path)
    assert spool.pending == 0
    spool.append(payloads(0, 2))
    assert drain(spool) == payloads(0, 2)


def test_a_segment_fully_acknowledged_before_a_crash_is_deleted_at_open(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=100)
    spool.append(payloads(0, 5))
    spool.append(payloads(5, 5))
    spool.append(payloads(10, 5))
    _, end = spool.read(10)
    # The cursor is written, then the process dies before deleting the old segment.
    (tmp_path / "cursor").write_text(f"{end.segment} {end.offset}\n")
    spool.close()
    before = sorted(p.name for p in tmp_path.glob("*.seg"))
    again = opened(tmp_path, segment_bytes=100)
    after = sorted(p.name for p in tmp_path.glob("*.seg"))
    assert len(after) < len(before)
    assert os.path.exists(tmp_path / after[0])
    assert drain(again) == payloads(10, 5)


def test_records_that_straddle_a_read_come_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ledger.spool.READ_BYTES", 40)  # a few records a read, cut mid-record
    spool = opened(tmp_path, segment_bytes=1000)
    rows = [*payloads(0, 50), b"y" * 300]  # and one record bigger than a read
    spool.append(rows)
    assert drain(spool, batch=9) == rows
