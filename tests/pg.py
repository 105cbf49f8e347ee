"""The test session's PostgreSQL: `skydeck.pg.scratch` (tests/conftest.py has the fixtures)."""

from skydeck.pg.scratch import PgCluster, start_cluster

__all__ = ["PgCluster", "start_cluster"]
