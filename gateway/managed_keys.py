"""Keeping a gateway's copy of the managed API keys fresh: load them all, then poll.

Requests never wait on the database: the ``Authenticator`` answers from its
in-memory copy, and ``KeySync`` feeds that copy. At start it loads every key;
then every ``refresh_s`` it asks for the rows whose ``updated_at`` is newer
than the newest it has seen, less ``OVERLAP_S``: ``updated_at`` is stamped when
a row is written, not when its transaction commits, so a write that commits a
moment after a later one is still caught by the next poll. Rows read twice are
applied twice, which changes nothing.

While the database is down the keys stay as last loaded and the poll keeps
trying (a gateway that starts with it down starts with its config keys only);
one warning when it goes, one line when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import asyncpg

from ledger.database import UNREACHABLE
from ledger.key_store import KeyStore, StoredKey

log = logging.getLogger("tollway.keys")

OVERLAP_S = 10.0  # longer than any write to api_keys takes to commit
# What the poll waits out: a database that is down, or one without the schema yet
# (the gateway started before `tollway db migrate` ran).
_NOT_NOW: tuple[type[BaseException], ...] = (*UNREACHABLE, asyncpg.PostgresError)


class KeySync:
    """Loads every managed key at ``start``, then polls for changed ones every ``refresh_s``."""

    def __init__(
        self, store: KeyStore, refresh_s: float, apply: Callable[[Sequence[StoredKey]], None]
    ):
        self.store = store
        self.refresh_s = refresh_s
        self.apply = apply
        self._newest: datetime | None = None  # the newest updated_at applied
        self._loaded = False  # a poll has answered
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first load (if it fails, the poll retries), then the poll in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="tollway-key-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll(self) -> bool:
        """Fetch and apply what changed; False when the database could not answer."""
        since = None if self._newest is None else self._newest - timedelta(seconds=OVERLAP_S)
        try:
            async with asyncio.timeout(max(5.0, self.refresh_s)):
                changed = await self.store.changed_since(since)
        except _NOT_NOW as exc:
            if not self._failing:
                log.warning(
                    "managed API keys: cannot read the database (%s: %s); keys stay as last "
                    "loaded, retrying every %g s",
                    type(exc).__name__,
                    exc,
                    self.refresh_s,
                )
            self._failing = True
            return False
        if self._failing or not self._loaded:
            log.info("managed API keys: read from the database (%d changed)", len(changed))
        self._loaded = True
        self._failing = False
        if changed:
            self.apply(changed)
            newest = changed[-1].updated_at
            self._newest = newest if self._newest is None else max(self._newest, newest)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.poll()
