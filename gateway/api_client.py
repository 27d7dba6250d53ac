"""The CLI's side of the gateway's HTTP API: one call, its answer or a one-line error.

``tollway usage`` and ``tollway keys`` talk to a running gateway (so auth and
tenant scoping stay in one place, the gateway); this is how they call it:
stdlib only, no proxies, the gateway's OpenAI-shaped error turned into
``ApiError`` with its status and message.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """The gateway answered with an error, or did not answer; the message says which."""


def open_api(
    url: str,
    api_key: str,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    timeout: float = 60,
) -> http.client.HTTPResponse:
    """The open response of one call (the caller reads and closes it), or ``ApiError``.
    Query parameters that are None are left out."""
    target = url.rstrip("/") + path
    params = {name: value for name, value in (query or {}).items() if value is not None}
    if params:
        target += "?" + urllib.parse.urlencode(params)
    headers = {"authorization": f"Bearer {api_key}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    request = urllib.request.Request(target, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        response: http.client.HTTPResponse = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw
        raise ApiError(f"{exc.code}: {message}") from None
    except OSError as exc:
        raise ApiError(f"cannot reach {url}: {exc}") from None
    return response


def call_json(url: str, api_key: str, method: str, path: str, **kwargs: Any) -> Any:
    """One call's JSON answer, or ``ApiError`` (an answer cut short included)."""
    with open_api(url, api_key, method, path, **kwargs) as response:
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"the answer from {url} was cut short: {exc!r}") from None
