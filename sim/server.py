"""Running the simulator inside an existing event loop: tests, benchmarks, fixtures.

    async with SimServer(SimConfig(served_model_names=["m"])) as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="x")

Binds 127.0.0.1 on a free port unless told otherwise, and runs with
`handler_cancellation=True` so client disconnects free batch slots at once.
"""

from __future__ import annotations

from types import TracebackType

from aiohttp import web

from sim.app import create_app
from sim.config import SimConfig
from sim.state import SIM_STATE, SimState


class SimServer:
    def __init__(
        self,
        config: SimConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self.app = create_app(config)
        self._host = host
        self._port = port
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=shutdown_timeout,
        )
        self.port = 0

    @property
    def state(self) -> SimState:
        """The live state (engine, counters, faults), for in-process assertions."""
        return self.app[SIM_STATE]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client wants as `base_url`."""
        return f"{self.url}/v1"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
