from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from pg import PgCluster, start_cluster
from skydeck.service import Service, Settings


@dataclass
class Daemon:
    service: Service
    url: str
    client: httpx.AsyncClient

    def count_rows(self, table: str = "messages") -> int:
        import sqlite3

        with sqlite3.connect(self.service.db_path) as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


CREDENTIAL_AND_DAEMON_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "SKYDECK_TOKEN",
    "SKYDECK_JWT_SECRET",
    "SKYDECK_JWKS_URL",
    "SKYDECK_JWT_ISSUER",
    "SKYDECK_URL",
)


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no credentials or daemon settings from the machine they run on."""
    for name in CREDENTIAL_AND_DAEMON_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A real skydeck service on a loopback port, in this test's Trio run."""
    service = Service(Settings(port=0, data_dir=tmp_path / "data"))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
            yield Daemon(service, binds[0], client)
        service.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throw-away PostgreSQL cluster for the whole test session (tests/pg.py)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A database of this test's own, migrated (from the template)."""
    return pg_cluster.new_database()
