"""GPU-seconds are conserved: per replica, attributed + accrued + foreign + idle = wall x gpus."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.occupancy import OccupancyLedger

# One step: wait `dt`, then do `op` ("start", "finish" the k-th active request, or
# "observe" vLLM reporting `n` running).
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.sampled_from(["start", "finish", "observe"]),
        st.integers(min_value=0, max_value=40),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(
    gpus=st.floats(min_value=0.25, max_value=8),
    t0=st.floats(min_value=0, max_value=1e6),
    ops=steps,
)
def test_conservation_on_random_sequences(
    gpus: float, t0: float, ops: list[tuple[float, str, int]]
) -> None:
    ledger = OccupancyLedger(gpus, t0)
    now = t0
    active: list[int] = []
    per_request: dict[int, float] = {}
    next_id = 0
    for dt, op, n in ops:
        now += dt
        if op == "start" or (op == "finish" and not active):
            ledger.start(next_id, now)
            active.append(next_id)
            next_id += 1
        elif op == "finish":
            key = active.pop(n % len(active))
            per_request[key] = ledger.finish(key, now)
            assert per_request[key] >= 0
        else:
            ledger.observe_running(n, now)
    snap = ledger.snapshot(now + 1.0)
    total = snap.attributed_gpu_s + snap.accrued_gpu_s + snap.foreign_gpu_s + snap.idle_gpu_s
    expected = (now + 1.0 - t0) * gpus
    assert math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(
        sum(per_request.values()), snap.attributed_gpu_s, rel_tol=1e-9, abs_tol=1e-9
    )
    assert snap.in_flight == len(active)


def test_a_lone_request_gets_the_whole_replica() -> None:
    ledger = OccupancyLedger(gpus=2, now=100.0)
    ledger.start("a", 101.0)
    assert ledger.finish("a", 104.0) == pytest.approx(6.0)
    snap = ledger.snapshot(105.0)
    assert snap.idle_gpu_s == pytest.approx(4.0)  # 1 s before, 1 s after, x 2 GPUs


def test_overlapping_requests_split_the_overlap_equally() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    ledger.start("a", 0.0)
    ledger.start("b", 2.0)  # a alone 0-2: a += 2
    assert ledger.finish("a", 4.0) == pytest.approx(2.0 + 1.0)  # shared 2-4: each += 1
    assert ledger.finish("b", 5.0) == pytest.approx(1.0 + 1.0)  # alone 4-5: b += 1
    assert ledger.snapshot(5.0).idle_gpu_s == 0


def test_vllm_running_count_from_other_gateways_is_booked_as_foreign() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    ledger.start("mine", 0.0)
    ledger.observe_running(4, 0.0)  # 3 requests of other gateways share the replica
    assert ledger.finish("mine", 8.0) == pytest.approx(2.0)
    snap = ledger.snapshot(8.0)
    assert snap.foreign_gpu_s == pytest.approx(6.0)
    assert snap.idle_gpu_s == 0


def test_a_stale_count_does_not_outlive_this_gateways_requests() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    for key in "ab":
        ledger.start(key, 0.0)
    ledger.observe_running(2, 0.0)  # vLLM sees exactly our two: no foreign load
    ledger.finish("a", 1.0)
    ledger.finish("b", 1.0)
    snap = ledger.snapshot(3.0)  # the scrape still says 2, but nothing of ours or theirs runs
    assert (snap.foreign_gpu_s, snap.idle_gpu_s) == (0.0, pytest.approx(2.0))


def test_vllm_count_lower_than_local_does_not_shrink_the_divisor() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    for key in "abc":
        ledger.start(key, 0.0)
    ledger.observe_running(1, 0.0)  # stale scrape: the local count wins
    assert ledger.finish("a", 3.0) == pytest.approx(1.0)


def test_accrued_reads_a_running_request() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    ledger.start("a", 0.0)
    assert ledger.accrued("a", 2.5) == pytest.approx(2.5)


def test_double_start_is_rejected() -> None:
    ledger = OccupancyLedger(gpus=1, now=0.0)
    ledger.start("a", 0.0)
    with pytest.raises(ValueError, match="already started"):
        ledger.start("a", 1.0)


def test_idle_per_busy_over_the_window() -> None:
    from metering.utilisation import UtilisationWindow

    ledger = OccupancyLedger(gpus=1, now=0.0)
    window = UtilisationWindow(ledger, window_s=100, sample_s=1)
    ledger.start("a", 10.0)  # idle 0-10
    ledger.finish("a", 30.0)  # busy 10-30
    assert window.idle_per_busy(40.0) == pytest.approx(20 / 20)  # idle 0-10 and 30-40
    # Much later the samples before t=40 have left the window; its base is the
    # sample at 40 (idle 20): since then idle 30->500 and 550->560 minus 30->40,
    # i.e. 470 idle, against 50 busy.
    ledger.start("b", 500.0)
    ledger.finish("b", 550.0)
    assert window.idle_per_busy(560.0) == pytest.approx(470 / 50)
    assert UtilisationWindow(OccupancyLedger(1, 0.0)).idle_per_busy(10.0) == 0.0
