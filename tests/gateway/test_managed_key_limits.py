"""A key's own rate limits: set through the admin API or ``tollway keys``, stored, shown,
carried by rotation, and on the ``Principal`` the limiter reads (managed and config keys).

One real gateway on its own PostgreSQL; enforcement is tested with the limiter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from gateway.auth import Authenticator
from gateway.config import AuthConfig
from ledger.key_store import KeySpec, StoredKey, digest
from tests.conftest import KEY, OTHER_KEY, gateway_config, migrate_database, with_ledger
from tests.support import postgres_server
from tests.support.postgres_server import run_postgres
from tests.support.procs import Proc, start_gateway
from tests.support.redis_server import run_redis
from tests.support.tools import needs

TOLLWAY = str(Path(sys.executable).parent / "tollway")
ADMIN = OTHER_KEY  # the config's admin key
# No replica is needed to manage keys: closed ports, one per tier.
SMALL, LARGE = ["http://127.0.0.1:9"], ["http://127.0.0.1:7"]

needs_postgres = needs(postgres_server.installed(), "PostgreSQL (Debian package postgresql)")


@pytest.fixture(scope="module")
def gateway(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with run_postgres() as pg, run_redis() as redis_server:
        migrate_database(pg.url)
        config = gateway_config(SMALL, LARGE, redis_server.url)
        spool = tmp_path_factory.mktemp("spool")
        proc = start_gateway(log_dir, with_ledger(config, pg, spool))
        try:
            yield proc
        finally:
            proc.stop()


def admin(gateway: Proc, method: str, path: str = "", body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        gateway.url + "/admin/keys" + path,
        json=body,
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )


def tollway_keys(gateway: Proc, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOLLWAY, "keys", *argv, "--url", gateway.url],
        capture_output=True,
        text=True,
        timeout=30,
        env={"TOLLWAY_API_KEY": ADMIN, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def limits(key: dict[str, Any]) -> tuple[int | None, int | None]:
    return key["requests_per_minute"], key["tokens_per_minute"]


@needs_postgres
def test_the_admin_api_stores_shows_and_rotates_a_keys_limits(gateway: Proc) -> None:
    body = {"name": "limited", "tenant": "acme", "requests_per_minute": 60}
    made = admin(gateway, "POST", body={**body, "tokens_per_minute": 100_000})
    assert made.status_code == 201, made.text
    key = made.json()
    assert limits(key) == (60, 100_000)
    assert limits(admin(gateway, "GET", f"/{key['id']}").json()) == (60, 100_000)
    listed = admin(gateway, "GET", "?tenant=acme").json()["data"]
    assert [limits(k) for k in listed if k["id"] == key["id"]] == [(60, 100_000)]

    rotated = admin(gateway, "POST", f"/{key['id']}/rotate")
    assert rotated.status_code == 201, rotated.text
    assert limits(rotated.json()) == (60, 100_000)
    assert limits(rotated.json()["previous"]) == (60, 100_000)

    plain = admin(gateway, "POST", body={"name": "plain", "tenant": "acme"}).json()
    assert limits(plain) == (None, None)
    only_tokens = admin(
        gateway, "POST", body={"name": "t", "tenant": "acme", "tokens_per_minute": 5}
    )
    assert limits(only_tokens.json()) == (None, 5)


@needs_postgres
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requests_per_minute", 0),
        ("tokens_per_minute", -1),
        ("requests_per_minute", 2**31),  # past the column's integer
        ("tokens_per_minute", 1.5),
        ("requests_per_minute", "many"),
    ],
)
def test_a_bad_limit_is_a_400_naming_it(gateway: Proc, field: str, value: Any) -> None:
    refused = admin(gateway, "POST", body={"name": "bad", "tenant": "acme", field: value})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", field)


@needs_postgres
def test_the_cli_sets_and_lists_a_keys_limits(gateway: Proc) -> None:
    made = tollway_keys(gateway, "create", "--tenant", "cli-limits", "--name", "from-cli",
                        "--requests-per-minute", "120", "--tokens-per-minute", "50000",
                        "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert limits(key) == (120, 50_000)
    plain = tollway_keys(gateway, "create", "--tenant", "cli-limits", "--name", "plain", "--json")
    assert plain.returncode == 0, plain.stderr
    plain_id = json.loads(plain.stdout)["id"]

    shown = tollway_keys(gateway, "show", key["id"])
    assert shown.returncode == 0, shown.stderr
    assert limits(json.loads(shown.stdout)) == (120, 50_000)

    listed = tollway_keys(gateway, "list", "--tenant", "cli-limits")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    columns = header.split()
    rpm, tpm = columns.index("requests_per_minute"), columns.index("tokens_per_minute")
    cells = {row.split()[0]: row for row in rows}
    assert cells[key["id"]].split()[rpm : tpm + 1] == ["120", "50000"]
    # no limit: blank cells, aligned under their headers
    start = header.index("requests_per_minute")
    assert cells[plain_id][start : header.index("expires_at")].strip() == ""

    refused = tollway_keys(gateway, "create", "--tenant", "cli-limits", "--name", "zero",
                           "--requests-per-minute", "0")  # fmt: skip
    assert refused.returncode != 0
    assert "requests_per_minute" in refused.stderr


def stored(secret: str, **spec: Any) -> StoredKey:
    when = datetime.now(UTC)
    return StoredKey(
        id="key_" + secret[-4:],
        digest=digest(secret),
        hint=secret[-4:],
        spec=KeySpec(name="unit", tenant="unit", **spec),
        created_at=when,
        updated_at=when,
    )


def test_the_principal_carries_the_limits_of_managed_and_config_keys() -> None:
    auth = Authenticator(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"key": KEY, "tenant": "acme", "requests_per_minute": 10},
                    {"key": ADMIN, "tenant": "ops", "admin": True, "tokens_per_minute": 999},
                ]
            }
        )
    )
    auth.apply(
        [
            stored("sk-tw-unit-0001", requests_per_minute=60, tokens_per_minute=100_000),
            stored("sk-tw-unit-0002"),
        ]
    )

    def of(secret: str) -> tuple[int | None, int | None]:
        principal = auth.authenticate(f"Bearer {secret}")
        return principal.requests_per_minute, principal.tokens_per_minute

    assert of("sk-tw-unit-0001") == (60, 100_000)
    assert of("sk-tw-unit-0002") == (None, None)
    assert of(KEY) == (10, None)
    assert of(ADMIN) == (None, 999)
    assert auth.authenticate(f"Bearer {ADMIN}").admin


@pytest.mark.parametrize("value", [0, -3])
def test_a_config_keys_limit_must_be_positive(value: int) -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        AuthConfig.model_validate(
            {"keys": [{"key": KEY, "tenant": "acme", "requests_per_minute": value}]}
        )
