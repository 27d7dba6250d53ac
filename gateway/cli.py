"""The ``tollway`` command: serve, sim, check-config, usage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.listen.host
    port = args.port or settings.listen.port
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # client addresses are not used; skip the per-request middleware
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
        backlog=4096,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"tollway: invalid config: {exc}", file=sys.stderr)
        return 1
    resolved = settings.model_dump(mode="json")
    for key in resolved["auth"]["keys"]:
        key["key"] = key["key"][:3] + "...(redacted)"
    sys.stdout.write(orjson.dumps(resolved, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"tollway: {args.config} is valid", file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    """Print /v1/usage as a table (the API does the auth and the tenant scoping)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    query = {"group_by": args.group_by}
    query.update({k: v for k, v in (("start", args.start), ("end", args.end),
                                    ("tenant", args.tenant)) if v})  # fmt: skip
    url = args.url.rstrip("/") + "/v1/usage?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {args.api_key}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"tollway: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tollway: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(format_usage(body))
    return 0


USAGE_COLUMNS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "gpu_seconds",
    "cost_usd",
    "cost_loaded_usd",
    "saved_usd",
)


def format_usage(body: dict[str, Any]) -> str:
    """The usage API's answer as an aligned text table, totals last."""

    def cells(label: str, row: dict[str, Any]) -> list[str]:
        values = [f"{row[c]:.3f}" if c == "gpu_seconds" else str(row[c]) for c in USAGE_COLUMNS]
        return [label, *values]

    table = [[body["group_by"], *USAGE_COLUMNS]]
    table += [cells(row["key"], row) for row in body["data"]]
    table.append(cells("TOTAL", body["total"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    title = f"usage {body['start']} .. {body['end']}"
    if body.get("tenant"):
        title += f" tenant={body['tenant']}"
    lines = [title]
    for line in table:
        first, *rest = line
        padded = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        lines.append("  ".join(padded))
    return "\n".join(lines)


def _sim(args: argparse.Namespace) -> int:
    from sim.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to tollway.yaml")
    serve.add_argument("--host", help="overrides listen.host")
    serve.add_argument("--port", type=int, help="overrides listen.port")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument(
        "--drain-timeout",
        type=int,
        default=25,
        help="seconds to finish in-flight requests after SIGTERM "
        "(keep it under the orchestrator's grace period)",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and print it resolved")
    check.add_argument("config")
    check.set_defaults(func=_check_config)

    usage = sub.add_parser("usage", help="print metered usage and cost from a gateway")
    usage.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    usage.add_argument("--api-key", default=os.environ.get("TOLLWAY_API_KEY", ""))
    usage.add_argument("--group-by", default="tenant",
                       choices=["tenant", "tier", "model", "day", "cache"])  # fmt: skip
    usage.add_argument("--start", help="ISO date/time, UTC (default: today 00:00)")
    usage.add_argument("--end", help="ISO date/time, UTC (default: now)")
    usage.add_argument("--tenant", help="admin keys: one tenant only")
    usage.add_argument("--json", action="store_true", help="print the API's JSON")
    usage.set_defaults(func=_usage)

    router_parser = sub.add_parser("router", help="complexity routing: calibrate the cut point")
    from router.cli import configure_parser as configure_router
    from router.cli import run as run_router

    configure_router(router_parser)
    router_parser.set_defaults(func=run_router)

    sim = sub.add_parser("sim", help="run the vLLM-compatible simulator (a test double)")
    from sim.cli import configure_parser

    configure_parser(sim)
    sim.set_defaults(func=_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
