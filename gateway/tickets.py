"""A request's admission ticket: its tenant, priority and deadline, from key, tier and headers.

- Priority: the API key's ``priority``, else the tier's. ``x-tollway-priority``
  (an integer) may lower it, never raise it: a client can mark its own batch
  work as less urgent, not jump the queue.
- Deadline: ``x-tollway-deadline-ms`` (1 to ``scheduling.max_deadline_ms``),
  else ``scheduling.deadline_ms``, counted from the request's arrival: the
  longest it may wait for a slot before it is refused with 429.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.admission import Ticket
from gateway.auth import Principal
from gateway.config import SchedulingConfig
from gateway.errors import InvalidRequest

PRIORITY_HEADER = "x-tollway-priority"
DEADLINE_HEADER = "x-tollway-deadline-ms"


class TicketOffice:
    def __init__(self, config: SchedulingConfig, tier_priorities: Mapping[str, int]):
        self.config = config
        self.tier_priorities = dict(tier_priorities)

    def read_headers(self, headers: Mapping[str, str]) -> tuple[int | None, int]:
        """The client's priority (None: not sent) and deadline in ms; 400 when malformed."""
        priority = None
        raw = headers.get(PRIORITY_HEADER)
        if raw is not None:
            priority = _int_header(PRIORITY_HEADER, raw, -100, 100)
        deadline_ms = self.config.deadline_ms
        raw = headers.get(DEADLINE_HEADER)
        if raw is not None:
            deadline_ms = _int_header(DEADLINE_HEADER, raw, 1, self.config.max_deadline_ms)
        return priority, deadline_ms

    def issue(
        self,
        principal: Principal,
        tier: str,
        asked: tuple[int | None, int],
        arrived: float,
    ) -> Ticket:
        base = principal.priority
        if base is None:
            base = self.tier_priorities.get(tier, 0)
        priority, deadline_ms = asked
        if priority is not None:
            base = min(base, priority)
        return Ticket(principal.tenant, base, arrived + deadline_ms / 1000)


def _int_header(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidRequest(f"The {name} header must be an integer; got {raw!r}.") from None
    if not low <= value <= high:
        raise InvalidRequest(f"The {name} header must be between {low} and {high}; got {value}.")
    return value
