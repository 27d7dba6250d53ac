"""A fixed-answer upstream: every HTTP/1.1 request gets the same small chat completion.

A raw asyncio protocol on uvloop (keep-alive, ``Content-Length`` framing only),
so a 3 MB prompt costs it nothing but the read: the simulator would tokenise
it. Any path answers 200, so the gateway's health checks of its replica pass.

    .venv/bin/python bench/bigbody/upstream.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop

HOST = "127.0.0.1"
BODY = (
    b'{"id":"chatcmpl-bigbody","object":"chat.completion","created":1767225600,'
    b'"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"The quick brown fox jumps over the lazy dog."},"logprobs":null,'
    b'"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":23,'
    b'"total_tokens":47,"completion_tokens":24}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class FixedAnswer(asyncio.Protocol):
    """Reads each request (head plus ``Content-Length`` bytes), answers ``RESPONSE``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has asyncio.Transport's methods but not its class
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            total = end + 4 + content_length(bytes(self.buffer[:end]))
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            if self.transport is not None:
                self.transport.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FixedAnswer, HOST, port, backlog=1024)
    print(f"fixed-answer upstream on {HOST}:{port}, {len(BODY)}-byte answers", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
