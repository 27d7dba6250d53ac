"""The thinnest FastAPI + aiohttp proxy: the baseline tollway's own cost is judged against.

One route, ``POST /v1/chat/completions``: read the body, post it with one
shared ``aiohttp.ClientSession`` to the same path on the upstream, answer with
the upstream's status and bytes. A streamed answer (``text/event-stream``) is
relayed chunk by chunk, as any proxy must; anything else is read whole. No
auth, routing, metering, validation or error mapping: what is left is what
any Python gateway on this stack pays per request. Served by stock uvicorn
with uvloop and httptools, access log off, the server options ``tollway
serve`` uses, one process.

    .venv/bin/python bench/overhead/thin_proxy.py --port 9000 --upstream http://127.0.0.1:8000
    .venv/bin/python -m bench.overhead.thin_proxy ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

PATH = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def create_app(upstream: str) -> FastAPI:
    """The proxy in front of ``upstream`` (``http://host:port``); the session lives in lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(upstream) as session:
            app.state.session = session
            yield

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.post(PATH)
    async def chat_completions(request: Request) -> Response:
        session: aiohttp.ClientSession = request.app.state.session
        body = await request.body()
        answer = await session.post(PATH, data=body, headers=JSON)
        if answer.content_type == "text/event-stream":
            return StreamingResponse(
                relay(answer), status_code=answer.status, media_type="text/event-stream"
            )
        async with answer:
            data = await answer.read()
        return Response(data, status_code=answer.status, media_type=answer.content_type)

    return app


async def relay(answer: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream's stream as it arrives; the connection goes back to the pool at its end."""
    async with answer:
        async for chunk in answer.content.iter_any():
            yield chunk


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port of the upstream")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        log_level="warning",
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
