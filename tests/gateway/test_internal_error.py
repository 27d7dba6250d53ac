"""A bug is a 500 with a generic OpenAI-shaped body; the trace goes to the log, never the client."""

from __future__ import annotations

import logging

import httpx2 as httpx
import pytest
from starlette.requests import Request

from gateway.app import create_app
from gateway.config import parse_settings
from tests.conftest import KEY, gateway_config


async def test_unknown_exception_is_a_clean_500(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse_settings(gateway_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"]), "t")
    app = create_app(settings)

    async def broken(self: object, ctx: object, request: Request) -> object:
        raise RuntimeError("secret internals: /etc/passwd line 42")

    monkeypatch.setattr("gateway.pipeline.Pipeline._prepare", broken)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        with caplog.at_level(logging.ERROR, logger="tollway.errors"):
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "sim-small", "messages": [{"role": "user", "content": "x"}]},
                headers={"authorization": f"Bearer {KEY}", "x-request-id": "trace-me-1"},
            )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error == {
        "message": "The gateway hit an internal error; it has been logged "
        "under request id trace-me-1.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"] == "trace-me-1"
    logged = [r for r in caplog.records if r.exc_info]
    assert logged
    assert "secret internals" in str(logged[0].exc_info[1])
