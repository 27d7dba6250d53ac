"""The aiohttp application: vLLM's HTTP surface and the engine's lifecycle.

`create_app(config)` builds everything from the config and nothing at import
time. Routes stay thin: the completion endpoints hand over to
`sim.serving.serve`, the rest read the shared `SimState`. The test-support
routes under `/sim/` come from `sim.admin`.

Lifecycle: the engine step loop is a task owned by a cleanup context (started
with the app, cancelled and awaited at cleanup). At shutdown, before aiohttp
waits for in-flight handlers, `stopping` is set so hung requests let go;
streams in progress run to the end within the runner's shutdown timeout.

Run it with `handler_cancellation=True` (as `sim.server.SimServer` and the CLI
do) so a client disconnect cancels its handler and frees its batch slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from sim.admin import add_admin_routes
from sim.config import SimConfig
from sim.metrics import render
from sim.serving import serve
from sim.state import SIM_STATE, SimState

log = logging.getLogger("sim")

# Long prompts are the point of some tests; aiohttp's default cap is 1 MiB.
_MAX_BODY_BYTES = 64 * 1024 * 1024


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, "completion")


async def list_models(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    cfg = state.config
    cards = [
        {
            "id": name,
            "object": "model",
            "created": state.started,
            "owned_by": "vllm",
            "root": cfg.model_name,
            "parent": None,
            "max_model_len": cfg.max_model_len,
            "permission": [
                {
                    "id": state.new_id("modelperm"),
                    "object": "model_permission",
                    "created": state.started,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in cfg.served_model_names
    ]
    return web.json_response({"object": "list", "data": cards})


async def health(request: web.Request) -> web.Response:
    unhealthy = request.app[SIM_STATE].faults.settings.unhealthy
    return web.Response(status=503 if unhealthy else 200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[SIM_STATE].config.version})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    engine = state.engine
    text = render(
        state.metrics,
        model_name=state.config.model_name,
        running=engine.num_running,
        waiting=engine.num_waiting,
        kv_cache_usage=engine.kv.usage,
    )
    return web.Response(
        body=text.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def _report_engine_crash(task: asyncio.Task[None]) -> None:
    # A dead step loop would leave every request waiting forever: say so loudly.
    if not task.cancelled() and task.exception() is not None:
        log.error("sim engine loop crashed", exc_info=task.exception())


async def _engine_loop(app: web.Application) -> AsyncIterator[None]:
    state = app[SIM_STATE]
    task: asyncio.Task[None] | None = None
    if not state.config.zero_delay:
        task = asyncio.create_task(state.engine.run(), name="sim-engine-loop")
        task.add_done_callback(_report_engine_crash)
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _release_hung_requests(app: web.Application) -> None:
    app[SIM_STATE].stopping.set()


def create_app(config: SimConfig) -> web.Application:
    """A vLLM-compatible server for `config`; see docs/simulator.md."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[SIM_STATE] = SimState(config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app)
    app.cleanup_ctx.append(_engine_loop)
    app.on_shutdown.append(_release_hung_requests)
    return app
