"""Managed API keys across two real gateways sharing one real PostgreSQL.

Keys are made, revoked and rotated through gateway ``one``'s admin API (or the
``tollway keys`` CLI) and used through gateway ``two`` with the openai SDK:
what ``one`` does must reach ``two`` within ``SPREAD_S``. Every secret the
module sees is kept, and the last test looks for it in both gateways' logs,
their /metrics and a dump of the database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import openai
import pytest

from gateway.auth import Authenticator
from gateway.config import AuthConfig
from gateway.errors import AuthenticationFailed
from ledger.key_store import KeySpec, StoredKey, digest
from tests.conftest import (
    FAST_SIM,
    KEY,
    OTHER_KEY,
    SdkFactory,
    gateway_config,
    migrate_database,
    with_ledger,
)
from tests.support import postgres_server
from tests.support.metrics import metrics_text
from tests.support.postgres_server import PostgresServer, run_postgres
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import RedisServer, run_redis
from tests.support.tools import needs

pytestmark = needs(postgres_server.installed(), "PostgreSQL (Debian package postgresql)")

TOLLWAY = str(Path(sys.executable).parent / "tollway")
ADMIN = OTHER_KEY  # the config's admin key
SPREAD_S = 2.5  # a change on one gateway is seen by every other within this (refresh_s 1 s)
T = TypeVar("T")


def ledgered_config(
    pg: PostgresServer, sims: list[Proc], spool: Path, redis_url: str
) -> dict[str, Any]:
    small, large = sims
    return with_ledger(gateway_config([small.url], [large.url], redis_url), pg, spool)


@dataclass
class Cluster:
    pg: PostgresServer
    one: Proc
    two: Proc
    sims: list[Proc]
    log_dir: Path
    spools: Path
    redis: RedisServer
    secrets: list[str] = field(default_factory=list)  # every secret handed out in this module

    def config(self, name: str) -> dict[str, Any]:
        return ledgered_config(self.pg, self.sims, self.spools / name, self.redis.url)


@pytest.fixture(scope="module")
def cluster(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started: list[Proc] = []
    with run_postgres() as pg, run_redis() as redis_server:  # budgets are held in Redis
        try:
            migrate_database(pg.url)  # its own database: a test here stops it
            for model in ("sim-small", "sim-large"):
                started.append(start_sim(log_dir, [model], *FAST_SIM))
            sims = started[:2]
            spools = tmp_path_factory.mktemp("spools")
            for name in ("one", "two"):
                config = ledgered_config(pg, sims, spools / name, redis_server.url)
                started.append(start_gateway(log_dir, config))
            yield Cluster(pg, started[2], started[3], sims, log_dir, spools, redis_server)
        finally:
            for proc in reversed(started):
                proc.stop()


def admin(
    gateway: Proc, method: str, path: str = "", body: Any = None, key: str | None = ADMIN
) -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    return httpx.request(
        method, gateway.url + "/admin/keys" + path, json=body, headers=headers, timeout=10
    )


def create(cluster: Cluster, **attributes: Any) -> dict[str, Any]:
    response = admin(cluster.one, "POST", body={"name": "test", "tenant": "acme", **attributes})
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    cluster.secrets.append(key["secret"])
    return key


def models(gateway: Proc, secret: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"}
    return httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10)


def wait_for(check: Callable[[], T | None], timeout: float = 10.0) -> tuple[T, float]:
    """``check()``'s first truthy answer and how long it took; fails after ``timeout``."""
    start = time.monotonic()
    while True:
        answer = check()
        elapsed = time.monotonic() - start
        if answer:
            return answer, elapsed
        assert elapsed < timeout, f"nothing within {timeout} s"
        time.sleep(0.02)


def accepted_on(gateway: Proc, secret: str) -> float:
    """Seconds until ``gateway`` accepts the key."""
    return wait_for(lambda: models(gateway, secret).status_code == 200)[1]


def refused_on(gateway: Proc, secret: str) -> tuple[str, float]:
    """The 401's message once ``gateway`` refuses the key, and how long that took."""

    def refusal() -> str | None:
        response = models(gateway, secret)
        if response.status_code == 200:
            return None
        assert response.status_code == 401, response.text
        message: str = response.json()["error"]["message"]
        return message

    return wait_for(refusal)


def chat(client: openai.OpenAI, model: str = "sim-small", **kwargs: Any) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, **kwargs
    )
    served: str = reply.model
    return served


def test_a_key_made_on_one_gateway_works_on_the_other(cluster: Cluster, sdk: SdkFactory) -> None:
    key = create(cluster, name="ci", metadata={"owner": "team-a"}, daily_usd=5, priority=3)
    secret = key["secret"]
    assert secret.startswith("sk-tw-")
    assert key["id"].startswith("key_")
    assert key["hint"] == f"sk-tw-...{secret[-4:]}"
    assert key["status"] == "active"
    assert key["daily_usd"] == "5.000000000"
    assert key["metadata"] == {"owner": "team-a"}
    assert chat(sdk(cluster.one, secret)) == "sim-small"  # at once where it was made
    spread = accepted_on(cluster.two, secret)
    assert spread <= SPREAD_S
    assert chat(sdk(cluster.two, secret), "sim-large") == "sim-large"
    shown = admin(cluster.two, "GET", f"/{key['id']}").json()
    assert shown == {k: v for k, v in key.items() if k != "secret"}
    listed = admin(cluster.two, "GET", "", None).json()["data"]
    assert key["id"] in [k["id"] for k in listed]
    assert all("secret" not in k for k in listed)


def test_revocation_reaches_the_other_gateway_within_the_stated_time(
    cluster: Cluster, sdk: SdkFactory
) -> None:
    key = create(cluster)
    secret = key["secret"]
    accepted_on(cluster.two, secret)
    start = time.monotonic()
    revoked = admin(cluster.one, "DELETE", f"/{key['id']}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    message, _ = refused_on(cluster.one, secret)
    assert message == "This API key has been revoked."
    refused_on(cluster.two, secret)
    spread = time.monotonic() - start
    print(f"revocation spread to the other gateway in {spread:.3f} s")
    assert spread <= SPREAD_S
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        chat(sdk(cluster.two, secret))
    again = admin(cluster.one, "DELETE", f"/{key['id']}").json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    listed = admin(cluster.one, "GET", "?tenant=acme").json()["data"]
    assert key["id"] not in [k["id"] for k in listed]
    listed = admin(cluster.one, "GET", "?tenant=acme&include_revoked=true").json()["data"]
    assert key["id"] in [k["id"] for k in listed]


def test_an_expired_key_is_refused_without_waiting_for_a_poll(
    cluster: Cluster, sdk: SdkFactory
) -> None:
    key = create(cluster, expires_in_s=2.0)
    expired = time.monotonic() + 2.0  # at the latest
    secret = key["secret"]
    accepted_on(cluster.two, secret)
    assert chat(sdk(cluster.two, secret)) == "sim-small"
    time.sleep(max(0.0, expired - time.monotonic()))
    for gateway in (cluster.one, cluster.two):
        with pytest.raises(openai.AuthenticationError, match="expired"):
            chat(sdk(gateway, secret))
    assert admin(cluster.two, "GET", f"/{key['id']}").json()["status"] == "expired"


def test_rotation_replaces_the_key(cluster: Cluster, sdk: SdkFactory) -> None:
    old = create(cluster, allowed_tiers=["small"], priority=7)
    accepted_on(cluster.two, old["secret"])
    response = admin(cluster.one, "POST", f"/{old['id']}/rotate")
    assert response.status_code == 201, response.text
    new = response.json()
    cluster.secrets.append(new["secret"])
    assert new["rotated_from"] == old["id"]
    assert new["allowed_tiers"] == ["small"]
    assert new["priority"] == 7
    assert new["previous"]["status"] == "revoked"
    message, _ = refused_on(cluster.one, old["secret"])
    assert "revoked" in message
    assert chat(sdk(cluster.one, new["secret"])) == "sim-small"
    _, spread = refused_on(cluster.two, old["secret"])
    assert spread <= SPREAD_S
    assert chat(sdk(cluster.two, new["secret"])) == "sim-small"
    again = admin(cluster.one, "POST", f"/{old['id']}/rotate")
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "key_not_active"


def test_rotation_with_grace_keeps_the_old_key_for_a_while(cluster: Cluster) -> None:
    old = create(cluster)
    accepted_on(cluster.two, old["secret"])
    response = admin(cluster.one, "POST", f"/{old['id']}/rotate", {"grace_s": 2})
    assert response.status_code == 201, response.text
    rotated = time.monotonic()
    new = response.json()
    cluster.secrets.append(new["secret"])
    assert new["previous"]["status"] == "active"
    assert new["previous"]["expires_at"] is not None
    accepted_on(cluster.two, new["secret"])
    assert models(cluster.two, old["secret"]).status_code == 200  # both work meanwhile
    message, _ = refused_on(cluster.two, old["secret"])
    assert "expired" in message
    assert time.monotonic() - rotated >= 1.9


def test_the_admin_api_needs_an_admin_key(cluster: Cluster) -> None:
    managed = create(cluster)["secret"]
    calls = [("GET", ""), ("POST", ""), ("GET", "/key_x"), ("DELETE", "/key_x"),
             ("POST", "/key_x/rotate")]  # fmt: skip
    for method, path in calls:
        body = {"name": "x", "tenant": "acme"} if method == "POST" else None
        for key, status in ((None, 401), ("sk-wrong-000000", 401), (KEY, 403), (managed, 403)):
            response = admin(cluster.one, method, path, body, key=key)
            assert response.status_code == status, (method, path, key, response.text)
            kind = "authentication_error" if status == 401 else "permission_error"
            assert response.json()["error"]["type"] == kind
    assert admin(cluster.one, "GET", "/key_nope").json()["error"]["code"] == "key_not_found"
    assert admin(cluster.one, "DELETE", "/key_nope").status_code == 404
    assert admin(cluster.one, "POST", "/key_nope/rotate").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tenant": "acme"}, "name"),
        ({"name": "", "tenant": "acme"}, "name"),
        ({"name": "x", "tenant": "no spaces"}, "tenant"),
        ({"name": "x", "tenant": "acme", "priority": 101}, "priority"),
        ({"name": "x", "tenant": "acme", "allowed_tiers": ["huge"]}, "allowed_tiers"),
        ({"name": "x", "tenant": "acme", "allowed_models": ["gpt-4"]}, "allowed_models"),
        ({"name": "x", "tenant": "acme", "allowed_models": []}, "allowed_models"),
        ({"name": "x", "tenant": "acme", "daily_usd": -1}, "daily_usd"),
        ({"name": "x", "tenant": "acme", "metadata": [1]}, "metadata"),
        ({"name": "x", "tenant": "acme", "expires_at": "2001-01-01T00:00Z"}, "expires_at"),
        ({"name": "x", "tenant": "acme", "expires_at": "2099-01-01T00:00"}, "expires_at"),
        ({"name": "x", "tenant": "acme", "admin": True}, "admin"),
    ],
)
def test_a_bad_body_is_a_400(cluster: Cluster, body: dict[str, Any], param: str) -> None:
    response = admin(cluster.one, "POST", body=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_other_bad_requests_are_400s(cluster: Cluster) -> None:
    raw = httpx.post(
        cluster.one.url + "/admin/keys",
        content=b"{not json",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert raw.status_code == 400
    assert admin(cluster.one, "GET", "?include_revoked=maybe").status_code == 400
    key = create(cluster)
    assert admin(cluster.one, "POST", f"/{key['id']}/rotate", {"grace_s": -1}).status_code == 400
    assert create(cluster, tenant="brand-new-tenant")["tenant"] == "brand-new-tenant"


def test_allowed_models_and_tiers_are_enforced(cluster: Cluster, sdk: SdkFactory) -> None:
    small_only = create(cluster, allowed_models=["sim-small"])["secret"]
    tier_bound = create(cluster, allowed_tiers=["small"], force_tier=True)["secret"]
    for gateway in (cluster.one, cluster.two):
        accepted_on(gateway, small_only)
        accepted_on(gateway, tier_bound)
    listed = [m["id"] for m in models(cluster.two, small_only).json()["data"]]
    assert listed == ["sim-small"]
    listed = [m["id"] for m in models(cluster.two, tier_bound).json()["data"]]
    assert listed == ["sim-small", "auto"]
    assert [m["id"] for m in models(cluster.two, KEY).json()["data"]] == [
        "sim-small",
        "sim-large",
        "auto",
    ]

    client = sdk(cluster.two, small_only)
    assert chat(client) == "sim-small"
    for model in ("sim-large", "auto"):
        with pytest.raises(openai.NotFoundError) as refused:
            chat(client, model)
        assert refused.value.code == "model_not_found"
        assert "does not exist or you do not have access to it" in refused.value.message

    client = sdk(cluster.two, tier_bound)
    assert chat(client, "auto") == "sim-small"  # the alias routes to the small tier
    with pytest.raises(openai.PermissionDeniedError, match="tier 'large'"):
        chat(client, "sim-large")
    with pytest.raises(openai.PermissionDeniedError, match="tier 'large'"):
        chat(client, "auto", extra_headers={"x-tollway-tier": "large"})
    assert chat(client, "auto", extra_headers={"x-tollway-tier": "small"}) == "sim-small"


def tollway_keys(
    cluster: Cluster, *argv: str, key: str = ADMIN
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOLLWAY, "keys", *argv, "--url", cluster.one.url],
        capture_output=True,
        text=True,
        timeout=30,
        env={"TOLLWAY_API_KEY": key, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def secret_of(output: str) -> str:
    return next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("secret"))


def test_the_cli_creates_lists_rotates_and_revokes(cluster: Cluster) -> None:
    made = tollway_keys(cluster, "create", "--tenant", "cli", "--name", "from-cli",
                        "--tier", "small", "--metadata", '{"ticket": 42}')  # fmt: skip
    assert made.returncode == 0, made.stderr
    secret = secret_of(made.stdout)
    cluster.secrets.append(secret)
    assert "shown once" in made.stdout
    key_id = made.stdout.split()[1]
    assert models(cluster.one, secret).status_code == 200

    listed = tollway_keys(cluster, "list", "--tenant", "cli")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:5] == ["id", "name", "tenant", "hint", "status"]
    assert [row.split()[:5] for row in rows] == [
        [key_id, "from-cli", "cli", f"sk-tw-...{secret[-4:]}", "active"]
    ]
    assert secret not in listed.stdout

    rotated = tollway_keys(cluster, "rotate", key_id)
    assert rotated.returncode == 0, rotated.stderr
    new_secret = secret_of(rotated.stdout)
    cluster.secrets.append(new_secret)
    assert models(cluster.one, secret).status_code == 401
    assert models(cluster.one, new_secret).status_code == 200
    new_id = rotated.stdout.split(" into ")[1].split()[0]

    revoked = tollway_keys(cluster, "revoke", new_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked {new_id} at ")
    assert models(cluster.one, new_secret).status_code == 401

    everything = tollway_keys(cluster, "list", "--tenant", "cli", "--include-revoked", "--json")
    keys = json.loads(everything.stdout)["data"]
    assert [(k["id"], k["status"]) for k in keys] == [(key_id, "revoked"), (new_id, "revoked")]
    assert keys[1]["rotated_from"] == key_id
    assert keys[1]["metadata"] == {"ticket": 42}

    refused = tollway_keys(cluster, "list", key=KEY)
    assert refused.returncode != 0
    assert "403" in refused.stderr


def test_keys_keep_working_while_the_database_is_down(
    cluster: Cluster, sdk: SdkFactory, procs: list[Proc]
) -> None:
    key = create(cluster)
    secret = key["secret"]
    accepted_on(cluster.two, secret)
    cluster.pg.kill()
    try:
        assert chat(sdk(cluster.two, secret)) == "sim-small"
        assert chat(sdk(cluster.one, secret)) == "sim-small"
        down = admin(cluster.one, "GET")
        assert down.status_code == 503
        assert "not reachable" in down.json()["error"]["message"]
        # A gateway that starts while the database is down serves its config keys,
        # and loads the managed ones once the database is back.
        three = start_gateway(cluster.log_dir, cluster.config("three"))
        procs.append(three)
        assert models(three, KEY).status_code == 200
        assert models(three, secret).status_code == 401
    finally:
        cluster.pg.start()
    accepted_on(three, secret)
    wait_for(lambda: admin(cluster.one, "GET").status_code == 200)
    later = create(cluster)
    _, spread = wait_for(lambda: models(cluster.two, later["secret"]).status_code == 200)
    assert spread <= SPREAD_S


def test_no_secret_in_logs_metrics_or_the_database(cluster: Cluster) -> None:
    create(cluster)  # at least one, if this test runs alone
    assert cluster.secrets
    texts = [proc.log.read_text(errors="replace") for proc in (cluster.one, cluster.two)] + [
        metrics_text(proc.url) for proc in (cluster.one, cluster.two)
    ]
    dump = subprocess.run(
        [str(postgres_server.PG_BIN / "pg_dump"), cluster.pg.url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "api_keys" in dump
    texts.append(dump)
    for secret in cluster.secrets:
        for text in texts:
            assert secret not in text
            assert secret[6:18] not in text  # nor a piece of one


def stored(secret: str, updated_s: float, *, revoked: bool = False, **spec: Any) -> StoredKey:
    when = datetime.fromtimestamp(1_800_000_000 + updated_s, UTC)
    return StoredKey(
        id="key_" + secret[-4:],
        digest=digest(secret),
        hint=secret[-4:],
        spec=KeySpec(name="unit", tenant=spec.pop("tenant", "unit"), **spec),
        created_at=when,
        updated_at=when,
        revoked_at=when if revoked else None,
    )


def test_the_authenticator_applies_the_newest_row_and_config_keys_win() -> None:
    auth = Authenticator(AuthConfig.model_validate({"keys": [{"key": KEY, "tenant": "acme"}]}))
    bearer = "Bearer sk-tw-unit-0001"
    auth.apply([stored("sk-tw-unit-0001", 1, allowed_tiers=("small",), priority=4)])
    principal = auth.authenticate(bearer)
    assert (principal.tenant, principal.key_id, principal.priority) == ("unit", "key_0001", 4)
    assert principal.may_use_tier("small")
    assert not principal.may_use_tier("large")
    assert not principal.admin
    auth.apply([stored("sk-tw-unit-0001", 2, revoked=True)])
    with pytest.raises(AuthenticationFailed, match="revoked"):
        auth.authenticate(bearer)
    auth.apply([stored("sk-tw-unit-0001", 1)])  # a poll's older read of the same row
    with pytest.raises(AuthenticationFailed, match="revoked"):
        auth.authenticate(bearer)
    auth.apply([stored(KEY, 3, tenant="someone-else")])  # a config key's twin: ignored
    assert auth.authenticate(f"Bearer {KEY}").tenant == "acme"
    with pytest.raises(AuthenticationFailed, match="Incorrect"):
        auth.authenticate("Bearer sk-tw-unit-0002")
    past = datetime.now(UTC) - timedelta(seconds=1)
    auth.apply([stored("sk-tw-unit-0003", 1, expires_at=past)])
    with pytest.raises(AuthenticationFailed, match="expired"):
        auth.authenticate("Bearer sk-tw-unit-0003")


def test_a_fallback_tier_the_key_may_not_use_is_not_tried(
    cluster: Cluster, sdk: SdkFactory, procs: list[Proc]
) -> None:
    """The small tier is down and falls back to large: a key bound to small gets the
    tier's 503, never an answer from large; a key allowed both is served by large."""
    config = cluster.config("fallback")
    config["tiers"][0]["replicas"] = [{"url": "http://127.0.0.1:9", "max_num_seqs": 4}]
    config["tiers"][0]["fallback"] = ["large"]
    gateway = start_gateway(cluster.log_dir, config)
    procs.append(gateway)
    bound = create(cluster, allowed_tiers=["small"])["secret"]
    both = create(cluster, allowed_tiers=["small", "large"])["secret"]
    accepted_on(gateway, bound)
    accepted_on(gateway, both)
    raw = sdk(gateway, both).chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "fall back"}], max_tokens=4
    )
    assert (raw.headers["x-tollway-tier"], raw.headers["x-tollway-fallback-from"]) == (
        "large", "small",
    )  # fmt: skip
    with pytest.raises(openai.InternalServerError) as refused:
        sdk(gateway, bound).chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "fall back"}], max_tokens=4
        )
    assert refused.value.status_code == 503


def test_a_keys_own_budget_is_enforced(cluster: Cluster, sdk: SdkFactory) -> None:
    """A managed key's daily budget is held against like its tenant's: a request whose
    worst case does not fit is refused naming the key's budget; one that fits is served
    with what is left of it."""
    tight = create(cluster, daily_usd=0.000000001)["secret"]  # under any request's worst case
    roomy = create(cluster, daily_usd=100)["secret"]
    for secret in (tight, roomy):
        accepted_on(cluster.two, secret)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk(cluster.two, tight).chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "costly"}], max_tokens=4000
        )
    assert refused.value.code == "budget_exceeded"
    assert "daily budget of $0.000000001 for this API key is spent" in refused.value.message
    raw = sdk(cluster.two, roomy).chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "budgeted"}], max_tokens=4
    )
    left = Decimal(raw.headers["x-tollway-budget-remaining-usd"])
    assert Decimal(100) - Decimal(raw.headers["x-tollway-cost-loaded-usd"]) >= left > 99


def test_a_keys_own_rate_limit_holds_across_both_gateways(
    cluster: Cluster, sdk: SdkFactory
) -> None:
    """A managed key's requests_per_minute is one limit for every gateway: its first two
    requests pass (one through each), the third is refused on either."""
    limited = create(cluster, requests_per_minute=2)["secret"]
    for gateway in (cluster.one, cluster.two):
        accepted_on(gateway, limited)
    first = sdk(cluster.one, limited).chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "one"}], max_tokens=4
    )
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    chat(sdk(cluster.two, limited))
    with pytest.raises(openai.RateLimitError) as refused:
        chat(sdk(cluster.one, limited))
    assert refused.value.code == "rate_limit_exceeded"
    assert "2 requests per minute" in refused.value.message
    assert "this API key" in refused.value.message
