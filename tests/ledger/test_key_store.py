"""The ``api_keys`` table through ``KeyStore``, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from ledger import schema
from ledger.key_store import (
    SECRET_PREFIX,
    KeyNotActive,
    KeyNotFound,
    KeySpec,
    KeyStore,
    StoredKey,
)
from tests.support import postgres_server
from tests.support.postgres_server import PostgresServer, run_postgres
from tests.support.tools import needs

pytestmark = needs(postgres_server.installed(), "PostgreSQL (Debian package postgresql)")

SPEC = KeySpec(
    name="ci",
    tenant="acme",
    priority=5,
    force_tier=True,
    allowed_models=("sim-small", "auto"),
    allowed_tiers=("small",),
    daily_usd=Decimal("1.5"),
    monthly_usd=Decimal("20.000000001"),
    requests_per_minute=60,
    tokens_per_minute=100_000,
    metadata={"owner": "team-a", "labels": {"env": "ci"}},
)


def pg_dump(server: PostgresServer) -> str:
    argv = [str(postgres_server.PG_BIN / "pg_dump"), "--data-only", "--table=api_keys", server.url]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with run_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def store(server: PostgresServer) -> AsyncIterator[KeyStore]:
    conn = await asyncpg.connect(server.url)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(server.url, min_size=0, max_size=2)
    try:
        yield KeyStore(pool)
    finally:
        await pool.close()


async def test_create_returns_the_secret_once_and_stores_its_digest(
    store: KeyStore, server: PostgresServer
) -> None:
    key, secret = await store.create(SPEC)
    assert secret.startswith(SECRET_PREFIX)
    assert len(secret) == len(SECRET_PREFIX) + 43
    assert key.id.startswith("key_")
    assert key.digest == hashlib.sha256(secret.encode()).digest()
    assert key.hint == secret[-4:]
    assert key.spec == SPEC
    assert (key.spec.requests_per_minute, key.spec.tokens_per_minute) == (60, 100_000)
    assert key.status(datetime.now(UTC)) == "active"
    assert key.revoked_at is None
    assert key.rotated_from is None
    stored = server.psql(f"SELECT encode(digest, 'hex'), hint FROM api_keys WHERE id = '{key.id}'")
    assert stored == f"{hashlib.sha256(secret.encode()).hexdigest()}|{secret[-4:]}"
    limits = server.psql(
        f"SELECT requests_per_minute, tokens_per_minute FROM api_keys WHERE id = '{key.id}'"
    )
    assert limits == "60|100000"
    assert await store.get(key.id) == key


async def test_secrets_are_distinct(store: KeyStore) -> None:
    made = [await store.create(KeySpec(name=f"n{i}", tenant="distinct")) for i in range(20)]
    assert len({secret for _, secret in made}) == 20
    assert len({key.id for key, _ in made}) == 20


async def test_list_filters_by_tenant_and_hides_revoked(store: KeyStore) -> None:
    first, _ = await store.create(KeySpec(name="one", tenant="list-a"))
    second, _ = await store.create(KeySpec(name="two", tenant="list-a"))
    other, _ = await store.create(KeySpec(name="three", tenant="list-b"))
    await store.revoke(second.id)
    assert [k.id for k in await store.list_keys("list-a")] == [first.id]
    assert [k.id for k in await store.list_keys("list-a", include_revoked=True)] == [
        first.id,
        second.id,
    ]
    everyone = {k.id for k in await store.list_keys()}
    assert {first.id, other.id} <= everyone
    assert second.id not in everyone


async def test_rate_limits_are_listed_and_optional(store: KeyStore) -> None:
    limited, _ = await store.create(KeySpec(name="rpm", tenant="limits", requests_per_minute=30))
    unlimited, _ = await store.create(KeySpec(name="none", tenant="limits"))

    def limits(keys: list[StoredKey]) -> dict[str, tuple[int | None, int | None]]:
        return {k.id: (k.spec.requests_per_minute, k.spec.tokens_per_minute) for k in keys}

    assert limits(await store.list_keys("limits")) == {
        limited.id: (30, None),
        unlimited.id: (None, None),
    }
    assert limits(await store.changed_since(None))[limited.id] == (30, None)


async def test_revoke_sets_revoked_at_once_and_moves_updated_at(store: KeyStore) -> None:
    key, _ = await store.create(KeySpec(name="r", tenant="revoke"))
    revoked = await store.revoke(key.id)
    assert revoked.revoked_at is not None
    assert revoked.updated_at > key.updated_at
    assert revoked.status(datetime.now(UTC)) == "revoked"
    again = await store.revoke(key.id)
    assert again.revoked_at == revoked.revoked_at  # the first revocation stands
    with pytest.raises(KeyNotFound):
        await store.revoke("key_nope")
    with pytest.raises(KeyNotFound):
        await store.get("key_nope")


async def test_rotate_now_revokes_the_old_key(store: KeyStore) -> None:
    old, old_secret = await store.create(SPEC)
    new, secret, retired = await store.rotate(old.id)
    assert secret != old_secret
    assert new.id != old.id
    assert new.rotated_from == old.id
    assert new.spec == old.spec
    assert (new.spec.requests_per_minute, new.spec.tokens_per_minute) == (60, 100_000)
    assert new.digest == hashlib.sha256(secret.encode()).digest()
    assert retired.id == old.id
    assert retired.revoked_at is not None
    assert retired.updated_at > old.updated_at
    with pytest.raises(KeyNotActive, match="revoked"):
        await store.rotate(old.id)
    with pytest.raises(KeyNotFound):
        await store.rotate("key_nope")


async def test_rotate_with_grace_expires_the_old_key_later(store: KeyStore) -> None:
    old, _ = await store.create(KeySpec(name="g", tenant="grace"))
    before = datetime.now(UTC)
    _, _, retired = await store.rotate(old.id, grace_s=60)
    assert retired.revoked_at is None
    assert retired.spec.expires_at is not None
    assert before + timedelta(seconds=59) < retired.spec.expires_at
    assert retired.spec.expires_at < before + timedelta(seconds=62)
    assert retired.status(datetime.now(UTC)) == "active"
    # a grace period never extends a key past its own expiry
    soon = datetime.now(UTC) + timedelta(seconds=10)
    short, _ = await store.create(KeySpec(name="s", tenant="grace", expires_at=soon))
    _, _, retired = await store.rotate(short.id, grace_s=3600)
    assert retired.spec.expires_at == soon


async def test_an_expired_key_cannot_be_rotated(store: KeyStore) -> None:
    key, _ = await store.create(
        KeySpec(name="e", tenant="expired", expires_at=datetime.now(UTC) + timedelta(seconds=0.2))
    )
    await asyncio.sleep(0.3)
    assert key.status(datetime.now(UTC)) == "expired"
    with pytest.raises(KeyNotActive, match="expired"):
        await store.rotate(key.id)


async def test_changed_since_sees_every_change(store: KeyStore) -> None:
    everything = await store.changed_since(None)
    mark = max(k.updated_at for k in everything)
    assert await store.changed_since(mark) == []
    key, _ = await store.create(KeySpec(name="c", tenant="changes"))
    assert [k.id for k in await store.changed_since(mark)] == [key.id]
    revoked = await store.revoke(key.id)
    assert await store.changed_since(key.updated_at) == [revoked]


async def test_a_hand_written_update_moves_updated_at(
    store: KeyStore, server: PostgresServer
) -> None:
    key, _ = await store.create(KeySpec(name="h", tenant="by-hand"))
    server.psql(f"UPDATE api_keys SET name = 'renamed' WHERE id = '{key.id}'")
    changed = await store.get(key.id)
    assert changed.spec.name == "renamed"
    assert changed.updated_at > key.updated_at


async def test_the_table_refuses_bad_rows(store: KeyStore) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await store.create(KeySpec(name="p", tenant="bad", priority=101))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.create(KeySpec(name="", tenant="bad"))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.create(KeySpec(name="b", tenant="bad", daily_usd=Decimal(-1)))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.create(KeySpec(name="r", tenant="bad", requests_per_minute=0))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.create(KeySpec(name="t", tenant="bad", tokens_per_minute=-5))


async def test_no_secret_is_stored_in_clear(store: KeyStore, server: PostgresServer) -> None:
    made = [await store.create(SPEC) for _ in range(3)]
    rotated = [await store.rotate(key.id) for key, _ in made]
    secrets = [s for _, s in made] + [s for _, s, _ in rotated]
    dump = await asyncio.to_thread(pg_dump, server)
    rows = server.psql("SELECT api_keys::text FROM api_keys")
    for secret in secrets:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        assert digest in dump  # the dump has the keys, as digests
        for text in (dump, rows):
            assert secret not in text
            assert secret[len(SECRET_PREFIX) :][:12] not in text  # nor a piece of one
