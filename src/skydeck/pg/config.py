"""The store settings of `skydeck serve` (multi-host.md §1, P1): flags and checks.

Importing this never imports psycopg, so a daemon without the ``postgres``
extra can still say, in one sentence, what to install (P1).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from ..model import is_valid_name

POSTGRES_SCHEMES = ("postgres", "postgresql")
TTL_RANGE = (2.0, 120.0)
MISSING_DRIVER = "PostgreSQL store needs: pip install 'skydeck[postgres]'"


class StoreConfigError(ValueError):
    """A store setting that stops the start: one sentence (exit 2)."""


def add_flags(serve: argparse.ArgumentParser) -> None:
    """The §1 flags (each also an environment variable, see service.ENV)."""
    group = serve.add_argument_group("several hosts on one PostgreSQL (docs/multi-host.md)")
    group.add_argument(
        "--store",
        metavar="URL",
        dest="store_url",
        help="sqlite:///ABS/PATH (default: <data dir>/skydeck.db) or postgres://... "
        "(env SKYDECK_STORE_URL)",
    )
    group.add_argument("--store-schema", metavar="NAME", help="default skydeck")
    group.add_argument("--host-id", metavar="ID", help="default <short hostname>-<port>")
    group.add_argument("--advertise-url", metavar="URL", help="the URL other hosts show")
    group.add_argument(
        "--lease-ttl", metavar="S", type=float, dest="lease_ttl_s", help="default 10 (2..120)"
    )
    group.add_argument(
        "--scan-interval", metavar="S", type=float, dest="scan_interval_s", help="default 1"
    )
    group.add_argument("--max-channels", metavar="N", type=int, help="default 0: fair share")
    group.add_argument(
        "--workspaces-shared",
        action="store_const",
        const=True,
        help="workspaces are on shared storage: every channel may move",
    )
    group.add_argument(
        "--fast-failover",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="expire hosts with no database session (default on)",
    )
    group.add_argument(
        "--store-wait", metavar="S", type=float, dest="store_wait_s", help="default 0"
    )
    group.add_argument("--store-pool", metavar="N", type=int, help="read sessions (default 4)")
    group.add_argument(
        "--no-migrate",
        action="store_const",
        const=False,
        dest="migrate",
        help="refuse to start on an older schema (run: skydeck migrate)",
    )


FLAG_NAMES = (
    "store_url",
    "store_schema",
    "host_id",
    "advertise_url",
    "lease_ttl_s",
    "scan_interval_s",
    "max_channels",
    "workspaces_shared",
    "fast_failover",
    "store_wait_s",
    "store_pool",
    "migrate",
)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in FLAG_NAMES}


def store_kind(url: str | None) -> str:
    """``sqlite`` or ``postgres``; a `StoreConfigError` names ``--store`` otherwise."""
    if not url:
        return "sqlite"
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return "sqlite"
    if scheme in POSTGRES_SCHEMES:
        if importlib.util.find_spec("psycopg") is None:
            raise StoreConfigError(MISSING_DRIVER)
        _check_libpq_url(url)
        return "postgres"
    raise StoreConfigError(
        f"--store must be sqlite:///ABS/PATH or a postgres:// URL, not a {scheme or 'bare'} URL"
    )


def _check_libpq_url(url: str) -> None:
    """P1: a URL libpq cannot parse is refused here, in one line that shows it
    redacted; libpq's own message may quote the password (``invalid
    percent-encoded token: "pa%zzss"``)."""
    import psycopg

    from .driver import redact

    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise StoreConfigError(f"--store {redact(url)} is not a valid libpq URL") from None


def sqlite_path(url: str) -> str:
    """sqlite:///ABS/PATH -> /ABS/PATH."""
    path = urlsplit(url).path
    if not path.startswith("/"):
        raise StoreConfigError("--store sqlite:/// needs an absolute path")
    return path


#: An unquoted PostgreSQL identifier: the schema goes into libpq's ``options``
#: (``-c search_path=...``), where a space would smuggle in another setting.
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


def check(
    *, url: str | None, host_id: str | None, lease_ttl_s: float, schema: str = "skydeck"
) -> None:
    store_kind(url)
    if not SCHEMA_NAME.match(schema):
        raise StoreConfigError(
            f"--store-schema {schema!r} must be a lower-case SQL name: letters, digits and "
            "'_', at most 63, not starting with a digit"
        )
    low, high = TTL_RANGE
    if not low <= lease_ttl_s <= high:
        raise StoreConfigError(f"--lease-ttl must be between {low:g} and {high:g} seconds")
    if host_id is not None and not is_valid_name(host_id):
        raise StoreConfigError(
            f"--host-id {host_id!r} must be letters, digits, '.', '_' or '-' (R1)"
        )


def default_host_id(port: int) -> str:
    """``<short hostname>-<port>``, made an R1 name."""
    short = socket.gethostname().split(".")[0] or "host"
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in short)
    return f"{cleaned}-{port}"[:64]
