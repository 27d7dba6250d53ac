"""The ledger's spool: an append-only log on local disk that every row passes through.

A row is durable once ``append`` returns: the batch is written and fsync'd.
The writer (``ledger.writer``) then reads rows in order (``read``), stores
them in PostgreSQL and moves the cursor past them (``ack``). A crash at any
point loses nothing that was appended: what is past the cursor is read again
at the next start, and the database skips the rows it already has.

Layout of the directory (one gateway process owns it: ``open`` locks it)::

    LOCK               flock'd while a process owns the spool
    000000000001.seg   segments, each a magic line then records:
    000000000002.seg     <u32 length><u32 crc32 of payload><payload>
    cursor             "<segment> <offset>": everything before it is in the database

Segments roll over at ``segment_bytes``; one wholly behind the cursor is
deleted. A record cut short by a crash (a torn tail) fails its length or
checksum and is cut off at ``open``; only the last segment can have one.
The spool holds at most ``max_bytes`` of rows not yet in the database:
``append`` keeps what fits and says how many that was.

Not thread-safe: the writer calls every method from one worker thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

log = logging.getLogger("tollway.ledger.spool")

MAGIC = b"tollway-spool 1\n"
HEADER = struct.Struct("<II")  # payload length, crc32 of payload
SUFFIX = ".seg"
READ_BYTES = 1 << 20  # read a backlog this much at a time, not a whole segment


def _whole(file: BinaryIO, offset: int) -> int:
    """The size of the record at ``offset``, header included (a read must hold one whole)."""
    file.seek(offset)
    head = file.read(HEADER.size)
    file.seek(offset)
    return HEADER.size + HEADER.unpack(head)[0] if len(head) == HEADER.size else HEADER.size


class Position(NamedTuple):
    segment: int
    offset: int


class SpoolLocked(Exception):
    """Another process owns the spool directory."""


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = 64 << 20):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.pending = 0  # records appended and not yet acknowledged
        self.pending_bytes = 0
        self._cursor = Position(1, len(MAGIC))
        self._sizes: dict[int, int] = {}  # segment -> bytes on disk
        self._tail: BinaryIO | None = None
        self._lock: int | None = None

    # -- opening ------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, cut a torn tail, and count what is waiting."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise SpoolLocked(
                f"the ledger spool {self.directory} is in use by another process: "
                "give each gateway process its own ledger.spool_dir"
            ) from None
        self._lock = lock
        self._cursor = self._read_cursor()
        segments = self._segments()
        for segment in segments:
            if segment < self._cursor.segment:
                os.unlink(self._path(segment))  # acknowledged before a crash, not yet deleted
                continue
            start = self._cursor.offset if segment == self._cursor.segment else len(MAGIC)
            count, good_end, size = self._scan(segment, start)
            if good_end < size:
                if segment != segments[-1]:
                    log.error("spool segment %s is corrupt after byte %d", segment, good_end)
                else:
                    log.warning(
                        "spool segment %s: cut a torn tail of %d bytes", segment, size - good_end
                    )
                os.truncate(self._path(segment), good_end)
                size = good_end
            self._sizes[segment] = size
            self.pending += count
            self.pending_bytes += size - start
        if not self._sizes:
            self._new_segment(self._cursor.segment)
        elif self._cursor.segment not in self._sizes:  # the cursor's segment was emptied
            self._cursor = Position(min(self._sizes), len(MAGIC))
        last = max(self._sizes)
        self._tail = open(self._path(last), "ab")  # noqa: SIM115 (open until close())

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    # -- appending ----------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> int:
        """Write and fsync as many of ``payloads`` as fit under ``max_bytes``, in order."""
        assert self._tail is not None, "open() the spool first"
        room = self.max_bytes - self.pending_bytes
        out = bytearray()
        kept = 0
        for payload in payloads:
            size = HEADER.size + len(payload)
            if size > room:
                break
            out += HEADER.pack(len(payload), zlib.crc32(payload))
            out += payload
            room -= size
            kept += 1
        if not kept:
            return 0
        segment = max(self._sizes)
        if self._sizes[segment] >= self.segment_bytes:
            segment = self._roll(segment)
        self._tail.write(out)
        self._tail.flush()
        os.fsync(self._tail.fileno())
        self._sizes[segment] += len(out)
        self.pending += kept
        self.pending_bytes += len(out)
        return kept

    # -- reading and acknowledging -------------------------------------------

    def read(self, max_records: int) -> tuple[list[bytes], Position]:
        """Up to ``max_records`` payloads from the cursor on, and where they end."""
        records: list[bytes] = []
        segment, offset = self._cursor
        while len(records) < max_records and segment in self._sizes:
            size = self._sizes[segment]
            with open(self._path(segment), "rb") as file:
                while len(records) < max_records and offset < size:
                    file.seek(offset)
                    data = file.read(min(size - offset, max(READ_BYTES, _whole(file, offset))))
                    at = 0
                    while len(records) < max_records and at + HEADER.size <= len(data):
                        length, _ = HEADER.unpack_from(data, at)
                        end = at + HEADER.size + length
                        if end > len(data):
                            break  # the rest of it is in the next read
                        records.append(data[at + HEADER.size : end])
                        at = end
                    offset += at
            if offset < size or segment == max(self._sizes):
                break
            segment, offset = segment + 1, len(MAGIC)
        return records, Position(segment, offset)

    def ack(self, position: Position, count: int) -> None:
        """Everything before ``position`` (``count`` records) is in the database."""
        old = self._cursor
        done_bytes = 0
        for segment in sorted(self._sizes):
            if segment > position.segment:
                break
            start = old.offset if segment == old.segment else len(MAGIC)
            end = position.offset if segment == position.segment else self._sizes[segment]
            done_bytes += max(0, end - start)
        self._write_cursor(position)
        self._cursor = position
        self.pending -= count
        self.pending_bytes -= done_bytes
        for segment in [s for s in self._sizes if s < position.segment]:
            del self._sizes[segment]
            os.unlink(self._path(segment))

    @property
    def cursor(self) -> Position:
        return self._cursor

    # -- files ----------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SUFFIX}"

    def _segments(self) -> list[int]:
        found = []
        for path in self.directory.iterdir():
            if path.suffix == SUFFIX and path.stem.isdigit():
                found.append(int(path.stem))
        return sorted(found)

    def _scan(self, segment: int, start: int) -> tuple[int, int, int]:
        """Records from ``start`` on, where the last whole one ends, and the file's size."""
        data = self._path(segment).read_bytes()
        if not data.startswith(MAGIC):
            if len(data) < len(MAGIC) and MAGIC.startswith(data):  # torn while being created
                self._path(segment).write_bytes(MAGIC)
                return 0, len(MAGIC), len(MAGIC)
            raise ValueError(f"{self._path(segment)} is not a tollway spool segment")
        count, at = 0, max(start, len(MAGIC))
        while at + HEADER.size <= len(data):
            length, crc = HEADER.unpack_from(data, at)
            end = at + HEADER.size + length
            if end > len(data) or zlib.crc32(data[at + HEADER.size : end]) != crc:
                break
            count += 1
            at = end
        return count, at, len(data)

    def _new_segment(self, segment: int) -> None:
        with open(self._path(segment), "wb") as file:
            file.write(MAGIC)
            file.flush()
            os.fsync(file.fileno())
        self._fsync_dir()
        self._sizes[segment] = len(MAGIC)

    def _roll(self, segment: int) -> int:
        assert self._tail is not None
        self._tail.close()
        self._new_segment(segment + 1)
        self._tail = open(self._path(segment + 1), "ab")  # noqa: SIM115 (open until close())
        return segment + 1

    def _read_cursor(self) -> Position:
        try:
            text = (self.directory / "cursor").read_text().split()
            return Position(int(text[0]), int(text[1]))
        except (FileNotFoundError, IndexError, ValueError):
            segments = self._segments()
            return Position(segments[0] if segments else 1, len(MAGIC))

    def _write_cursor(self, position: Position) -> None:
        tmp = self.directory / "cursor.tmp"
        with open(tmp, "w") as file:
            file.write(f"{position.segment} {position.offset}\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.directory / "cursor")

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
