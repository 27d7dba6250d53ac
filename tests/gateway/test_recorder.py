"""The recorder: reports queued by the request path, handed over a batch at a time."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.recorder import Recorder
from metering.report import RequestReport


def report(request_id: str) -> RequestReport:
    return RequestReport(request_id, "acme", "small", "m", "chat")


def test_each_report_reaches_every_consumer_once_in_order() -> None:
    seen: list[list[str]] = []
    also: list[int] = []

    def broken(batch: Sequence[RequestReport]) -> None:
        raise RuntimeError("a consumer's bug")

    recorder = Recorder(
        [lambda b: seen.append([r.request_id for r in b]), broken, lambda b: also.append(len(b))]
    )
    recorder.drain()  # nothing queued: nobody is called
    assert (seen, also) == ([], [])
    recorder.add(report("a"))
    recorder.add(report("b"))
    recorder.drain()
    recorder.add(report("c"))  # the same ``add`` after a drain: the next batch
    recorder.drain()
    recorder.drain()
    assert seen == [["a", "b"], ["c"]]
    assert also == [2, 1]  # a failing consumer loses only its own part
