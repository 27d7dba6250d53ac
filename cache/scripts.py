"""Lua scripts sent by their hash: ``EVALSHA``, and the text only when Redis lacks it.

A script's text goes over the wire once per Redis server (after a restart or
``SCRIPT FLUSH``, once more): every call sends its SHA1 instead, and on
``NOSCRIPT`` sends the text with ``EVAL``, which also caches it. On a cluster
the call goes to the node of its keys' slot, and the fallback caches the
script there. Rules of ``cache.redis_client`` apply: every key a script
touches shares one hash tag (the spend scripts also touch window keys named in
a hold's record, all under the tenant's tag).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


class Script:
    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Arg] = ()) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.text, len(keys), *keys, *args)
