"""The ``tollway`` command: serve, sim, check-config, usage, keys, db, router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import orjson

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

    from gateway.config import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_apps
    from gateway.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problem = _database_problem(settings)
    if problem:
        print(f"tollway: database: {problem}", file=sys.stderr)
        return 2
    apps = create_apps(settings)

    def server(
        app: ASGIApp, host: str, port: int, lifespan: Literal["on", "off"]
    ) -> uvicorn.Server:
        return uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                loop="uvloop",
                http="httptools",
                lifespan=lifespan,
                access_log=False,
                proxy_headers=False,  # client addresses are unused: skip that middleware
                log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout,
                backlog=4096,
            )
        )

    public = server(
        apps.public, args.host or settings.listen.host, args.port or settings.listen.port, "on"
    )
    admin = None
    if apps.admin is not None and settings.ops.admin_listen is not None:
        listen = settings.ops.admin_listen
        admin = server(apps.admin, listen.host, listen.port, "off")
    with asyncio.Runner(loop_factory=public.config.get_loop_factory()) as runner:
        runner.run(_run_servers(public, admin))
    return 0 if public.started else 3  # 3: uvicorn's "startup failed"


async def _run_servers(public: uvicorn.Server, admin: uvicorn.Server | None) -> None:
    """Both listeners on one loop until the public one stops.

    Each ``Server.serve`` catches SIGTERM/SIGINT while it runs and, once it has
    shut down, restores the handler it found and raises the signal again: so a
    SIGTERM stops both, one after the other, and the public listener drains its
    requests in flight as it does alone. It also stops the admin listener when
    it ends for any other reason (its lifespan failed to start)."""
    if admin is None:
        await public.serve()
        return
    admin_task = asyncio.create_task(admin.serve())
    try:
        await public.serve()
    finally:
        admin.should_exit = True
        await admin_task


def _database_problem(settings: Settings) -> str | None:
    """Why the gateway must not start on its database (a schema it does not know), or None.

    A database that does not answer is not a reason: the gateway starts, its rows wait
    in the spool, and the writer checks the schema when the database answers."""
    import asyncio

    from ledger.database import check_schema
    from ledger.schema import SchemaError

    if settings.database is None:
        logging.getLogger("tollway").warning(
            "no database configured: requests are not recorded in a ledger, "
            "/v1/usage answers 503 and only the keys in auth.keys work"
        )
        return None
    try:
        version = asyncio.run(check_schema(settings.database))
    except SchemaError as exc:
        return str(exc)
    if version is None:
        logging.getLogger("tollway").warning(
            "the database does not answer: starting anyway; ledger rows wait in %s",
            settings.ledger.spool_dir,
        )
    return None


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
    if resolved["ops"]["metrics_token"] is not None:
        resolved["ops"]["metrics_token"] = "(redacted)"
    sys.stdout.write(orjson.dumps(resolved, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"tollway: {args.config} is valid", file=sys.stderr)
    return 0


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

    from gateway import db_cli, keys_cli, usage_cli

    usage_cli.configure_parser(
        sub.add_parser("usage", help="print metered usage and cost from the ledger")
    )
    keys_cli.configure_parser(sub.add_parser("keys", help="manage API keys (admin)"))
    db_cli.configure_parser(sub.add_parser("db", help="the PostgreSQL database: migrate, status"))

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
