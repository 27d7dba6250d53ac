"""``tollway keys``: create, list, show, revoke and rotate managed API keys (the admin API).

Every command calls a gateway (``--url``) with an admin key (``--api-key``,
default ``$TOLLWAY_API_KEY``). ``create`` and ``rotate`` print the new secret:
the only time it is shown. ``--json`` prints the API's answer as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from typing import Any

from gateway.api_client import ApiError, call_json

LIST_COLUMNS = (
    "id",
    "name",
    "tenant",
    "hint",
    "status",
    "requests_per_minute",
    "tokens_per_minute",
    "expires_at",
    "created_at",
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="create a key and print its secret (once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument(
        "--model",
        action="append",
        dest="allowed_models",
        metavar="MODEL",
        help="a model name it may use (repeat; default: any)",
    )
    create.add_argument(
        "--tier",
        action="append",
        dest="allowed_tiers",
        metavar="TIER",
        help="a tier it may be served by (repeat; default: any)",
    )
    create.add_argument("--priority", type=int, help="admission priority, -100..100")
    create.add_argument("--force-tier", action="store_true", help="may send x-tollway-tier")
    create.add_argument("--daily-usd", help="the key's daily budget, in USD")
    create.add_argument("--monthly-usd", help="the key's monthly budget, in USD")
    create.add_argument(
        "--requests-per-minute", type=int, metavar="N", help="the key's request rate limit"
    )
    create.add_argument(
        "--tokens-per-minute",
        type=int,
        metavar="N",
        help="the key's token rate limit (prompt + completion)",
    )
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", help="ISO 8601 time with its zone, e.g. 2027-01-01T00:00Z")
    expiry.add_argument("--expires-in", type=float, metavar="SECONDS")
    create.add_argument("--metadata", help="a JSON object stored with the key")
    create.set_defaults(func=_create)

    listing = sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    listing.add_argument("--include-revoked", action="store_true")
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", help="one key's attributes")
    show.add_argument("id")
    show.set_defaults(func=_show)

    revoke = sub.add_parser("revoke", help="revoke a key: refused on every gateway within ~1 s")
    revoke.add_argument("id")
    revoke.set_defaults(func=_revoke)

    rotate = sub.add_parser("rotate", help="a new key like this one; print its secret (once)")
    rotate.add_argument("id")
    rotate.add_argument(
        "--grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the old key keeps working this long (default: revoked now)",
    )
    rotate.set_defaults(func=_rotate)

    for command in (create, listing, show, revoke, rotate):
        command.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
        command.add_argument(
            "--api-key",
            default=os.environ.get("TOLLWAY_API_KEY", ""),
            help="an admin key (default: $TOLLWAY_API_KEY)",
        )
        command.add_argument("--json", action="store_true", help="print the API's JSON")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin API call: its JSON answer, or ``ApiError``."""
    return call_json(args.url, args.api_key, method, path, body=body, timeout=30)


def _run(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    try:
        return call(args, method, path, body)
    except ApiError as exc:
        raise SystemExit(f"tollway: {exc}") from None


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": args.tenant, "name": args.name}
    for field in (
        "allowed_models",
        "allowed_tiers",
        "priority",
        "daily_usd",
        "monthly_usd",
        "requests_per_minute",
        "tokens_per_minute",
        "expires_at",
    ):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.force_tier:
        body["force_tier"] = True
    if args.expires_in is not None:
        body["expires_in_s"] = args.expires_in
    if args.metadata is not None:
        try:
            body["metadata"] = json.loads(args.metadata)
        except ValueError as exc:
            raise SystemExit(f"tollway: --metadata is not JSON: {exc}") from None
    key = _run(args, "POST", "/admin/keys", body)
    print(json.dumps(key, indent=2) if args.json else _created("created", key))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    key = _run(args, "POST", f"/admin/keys/{_quoted(args.id)}/rotate", {"grace_s": args.grace})
    if args.json:
        print(json.dumps(key, indent=2))
        return 0
    old = key["previous"]
    fate = f"revoked at {old['revoked_at']}" if old["revoked_at"] else f"until {old['expires_at']}"
    print(_created(f"rotated {old['id']} ({fate}) into", key))
    return 0


def _created(verb: str, key: dict[str, Any]) -> str:
    return (
        f"{verb} {key['id']} (tenant {key['tenant']}, name {key['name']})\n"
        f"secret: {key['secret']}\n"
        "This secret is shown once: store it now."
    )


def _list(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("tenant", args.tenant),) if v}
    if args.include_revoked:
        query["include_revoked"] = "true"
    path = "/admin/keys" + ("?" + urllib.parse.urlencode(query) if query else "")
    body = _run(args, "GET", path)
    print(json.dumps(body, indent=2) if args.json else format_keys(body["data"]))
    return 0


def _show(args: argparse.Namespace) -> int:
    key = _run(args, "GET", f"/admin/keys/{_quoted(args.id)}")
    print(json.dumps(key, indent=2))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    key = _run(args, "DELETE", f"/admin/keys/{_quoted(args.id)}")
    print(json.dumps(key, indent=2) if args.json else f"revoked {key['id']} at {key['revoked_at']}")
    return 0


def _quoted(key_id: str) -> str:
    return urllib.parse.quote(key_id, safe="")


def format_keys(keys: list[dict[str, Any]]) -> str:
    """Keys as an aligned text table."""
    table = [list(LIST_COLUMNS)]
    table += [["" if key[c] is None else str(key[c]) for c in LIST_COLUMNS] for key in keys]
    widths = [max(len(line[i]) for line in table) for i in range(len(LIST_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
