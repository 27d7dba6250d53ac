"""What one request of an overload run came to, and what the load generator writes to its file.

A ``Record`` is plain data, so the load generator (its own pinned process)
and the summary (the runner) share it through JSON. Times are seconds from
the run's start; latencies are measured from the request's *scheduled*
arrival, so a late load generator cannot hide queueing (coordinated omission).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["ok", "shed", "error", "unfinished"]
# ok: 200 and the stream reached [DONE] with content; shed: 429; error: any other
# status, a connection error or a stream cut or ending in an error event;
# unfinished: still running when the load generator's drain limit ran out.


@dataclass
class Record:
    at_s: float  # scheduled arrival
    kind: Kind = "unfinished"
    status: int | None = None
    ttft_s: float | None = None  # to the first chunk with non-empty content
    total_s: float | None = None  # to the end of the response (ok, shed, error)
    retry_after: str | None = None
    error: str | None = None

    @property
    def end_s(self) -> float | None:
        return None if self.total_s is None else self.at_s + self.total_s


@dataclass
class LoadResult:
    """One load generator run: its records and what it saw around them."""

    mode: str  # "open" or "closed"
    duration_s: float  # the arrival window (open) or the sending window (closed)
    records: list[Record]
    send_lag_p99_s: float = 0.0  # how late requests left, against their schedule
    send_lag_max_s: float = 0.0
    cpu_s: float = 0.0  # the load generator's own CPU time over the window
    watch_max: dict[str, float] = field(default_factory=dict)  # polled gauge -> highest seen
    watch_samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        records = [Record(**r) for r in data["records"]]
        return cls(**{**data, "records": records})
