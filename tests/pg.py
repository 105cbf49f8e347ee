"""The test session's PostgreSQL: `skydeck.pg.scratch` (tests/conftest.py has the
fixtures), and what the real-daemon tests read it with."""

from typing import Any

import psycopg

from skydeck.pg.scratch import PgCluster, start_cluster

__all__ = ["PgCluster", "query", "start_cluster"]


def query(url: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of one statement in the store's schema, on a session of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = skydeck")
        return conn.execute(statement.encode(), args or None).fetchall()
