"""A throw-away PostgreSQL cluster, for the tests and the benchmarks (multi-host.md §8).

One cluster per test session, on a Unix socket only (``listen_addresses=''``,
so no port can collide with anything), in a directory under /tmp: pytest's
``tmp_path`` sits under a root-only 0700 directory the server user cannot
enter. PostgreSQL refuses to run as root, so as root every server command runs
as ``nobody`` (``runuser``); any other user runs them directly.

A template database is migrated by skydeck's own migrator (so every session
exercises P4), and each test gets ``CREATE DATABASE t_<n> TEMPLATE
skydeck_template`` (~20 ms). Durability is off (``fsync=off``): these are
tests of ownership and fencing, not of the disk; ``durable=True`` (the
benchmarks, the store-outage test) keeps PostgreSQL's defaults.

If the cluster cannot start, the fixture fails with the log's tail: under
``make test`` nothing is skipped (the Makefile installs PostgreSQL first).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from . import schema

TEMPLATE = "skydeck_template"
USER = "skydeck"


def find_bin() -> Path:
    """``SKYDECK_TEST_PG_BIN``, else the newest version under /usr/lib/postgresql."""
    configured = os.environ.get("SKYDECK_TEST_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "no PostgreSQL binaries under /usr/lib/postgresql (run `make postgres`, "
            "or set SKYDECK_TEST_PG_BIN)"
        )
    return found[-1].parent


class PgCluster:
    """initdb, pg_ctl start/stop, and a database per test."""

    def __init__(self, bin_dir: Path | None = None, *, durable: bool = False) -> None:
        self.bin = bin_dir or find_bin()
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="skydeck-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.logfile = self.root / "log"
        self._as_nobody = os.geteuid() == 0
        self._names = itertools.count(1)
        if self._as_nobody:
            shutil.chown(self.root, "nobody", "nogroup")
        self.root.chmod(0o755)

    def _server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_nobody:
            command = ["runuser", "-u", "nobody", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"log tail:\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def init(self) -> None:
        self._server(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        durability = (
            ""
            if self.durable
            else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        options = f"-c listen_addresses='' -k {self.root} -c max_connections=300{durability}"
        self._server(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.logfile),
            "start",
            "-o",
            options,
        )

    def stop(self, mode: str = "immediate") -> None:
        self._server(str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", mode)

    def remove(self) -> None:
        self._server(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", check=False
        )
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@/{database}?host={self.root}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def make_template(self) -> None:
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        with psycopg.connect(self.url(TEMPLATE)) as conn:
            schema.migrate(conn, "skydeck")

    def new_database(self, *, template: str | None = TEMPLATE) -> str:
        """A fresh database (migrated, from the template, unless ``template`` is None)."""
        name = f"t_{next(self._names)}"
        with self.admin() as conn:
            if template is None:
                conn.execute(f"CREATE DATABASE {name}")
            else:
                conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)


def start_cluster(*, durable: bool = False) -> PgCluster:
    cluster = PgCluster(durable=durable)
    try:
        cluster.init()
        cluster.start()
        cluster.make_template()
    except BaseException:
        cluster.remove()
        raise
    return cluster
