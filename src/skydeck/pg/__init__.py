"""PostgreSQL for several skydeck hosts (shared/spec/multi-host.md).

- `driver`: psycopg 3's sync API on Trio worker threads (one hop per batch),
  LISTEN on the connection's socket with `trio.lowlevel.wait_readable`.
- `schema`: the tables of §2 and the one migrator (P4).
- `ownership`: hosts, leases and fencing tokens (§3), all on the database clock.

Nothing here imports psycopg at module level but `driver`, so a daemon without
the ``postgres`` extra fails with one sentence (P1), not an ImportError.
"""
