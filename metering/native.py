"""The relayed answer's metering step in C (``metering/_relay.c``), when it was built.

``relay`` is the C function, configured with the report's types and header
names, or None when the package was installed without a C compiler (the
extension is optional): ``gateway.meter.Meter.relay`` then runs its Python
reference, which it also runs whenever the C step answers ``NotImplemented``
(anything but the plain answer). tests/metering/test_relay_native.py holds
the two equal.

``record_log()`` is where the C step keeps the reports of relayed answers
that nothing reads at once, compact, until the recorder takes them (made as
``RequestReport``s then): no Python object per report lives between a request
and its batch (None without the extension).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metering.pricing import Cost
from metering.report import FIGURE_NAMES, RequestReport
from metering.usage import TokenUsage

relay: Callable[..., Any] | None
record_log: Callable[[], Any] | None
try:
    from metering import _relay
except ImportError:  # built without a C compiler
    relay = record_log = None
else:
    _relay.configure(RequestReport, TokenUsage, Cost, FIGURE_NAMES)
    relay = _relay.relay
    record_log = _relay.RecordLog
