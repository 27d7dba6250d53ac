"""The ``tollway`` command: serve, sim, check-config, usage, keys, db, router."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from gateway.config import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
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
    host = args.host or settings.listen.host
    port = args.port or settings.listen.port
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
