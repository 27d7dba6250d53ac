"""Test-support endpoints under `/sim/`. Not part of vLLM's API.

- `GET  /sim/stats`    request counters and engine occupancy (see `sim.state`)
- `POST /sim/reset`    zero the counters, Prometheus metrics and recorded requests
- `GET  /sim/faults`   the fault settings in force
- `POST /sim/faults`   merge a JSON object of `FaultSettings` fields into them
- `DELETE /sim/faults` turn every fault off
- `GET  /sim/requests` the last completion requests received (`?limit=N`), with
  their lower-cased headers and JSON body

Errors use vLLM's error shape, like everything else the simulator answers.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from pydantic import ValidationError

from sim.protocol import SimError, decode_json
from sim.state import SIM_STATE


def _json(obj: object) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def get_stats(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].stats_json())


async def reset(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.reset()
    return _json(state.stats_json())


async def get_faults(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].faults.settings.model_dump())


async def set_faults(request: web.Request) -> web.Response:
    injector = request.app[SIM_STATE].faults
    try:
        changes = decode_json(await request.read())
        settings = injector.update(changes)
    except SimError as exc:
        return _error(exc)
    except ValidationError as exc:
        return _error(SimError.invalid(exc))
    return _json(settings.model_dump())


async def clear_faults(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].faults.clear().model_dump())


async def recent_requests(request: web.Request) -> web.Response:
    recent = list(request.app[SIM_STATE].recent)
    try:
        limit = int(request.query.get("limit", len(recent)))
    except ValueError:
        return _error(SimError("limit must be an integer", 400, "limit"))
    rows = recent[-limit:] if limit > 0 else []
    return _json([row.to_json() for row in rows])


def _error(exc: SimError) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json")


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/sim/stats", get_stats)
    app.router.add_post("/sim/reset", reset)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_post("/sim/faults", set_faults)
    app.router.add_delete("/sim/faults", clear_faults)
    app.router.add_get("/sim/requests", recent_requests)
