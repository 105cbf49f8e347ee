"""The in-sandbox relay: 127.0.0.1:3128 inside the sandbox -> the gateway's unix socket.

    python3 -I -S /run/skydeck/relay.py 3128 /run/skydeck/gateway.sock -- PROGRAM ARG...

A sandbox has its own network namespace with only ``lo`` (S15), so nothing in it
can reach the host. Its one way out is the gateway socket bound into it (S9 row
7); programs speak TCP to proxies, so this relay (S16)

- listens on 127.0.0.1:PORT *before* it starts PROGRAM, so PROGRAM's first
  request never meets a closed port;
- starts PROGRAM as its child with stdin/stdout/stderr inherited;
- pipes every accepted connection byte for byte to the socket, in both
  directions, each connection on its own threads;
- exits with PROGRAM's status (128+N when PROGRAM died of signal N, which is how
  bwrap reports it too, S12).

It holds no policy: talking to the socket directly meets the same gateway.
Standard library only and run with ``-I -S`` (no PYTHON* variables, no
site-packages), since its start-up is part of every sandboxed claude turn; it
uses ``_signal`` (``signal`` imports ``enum``). Nothing in skydeck imports it;
bwrap binds this file read-only at /run/skydeck/relay.py.
"""

from __future__ import annotations

import _signal as signal
import os
import socket
import sys
import threading

CHUNK = 65536
#: Reset to the default in PROGRAM: the ones Python itself ignores or handles.
RESET = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT)


def copy(source: socket.socket, sink: socket.socket) -> None:
    """One direction until EOF; then half-close, so the other direction can finish."""
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:  # noqa: SIM105 (contextlib would cost start-up time)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(conn: socket.socket, path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError:
        conn.close()
        upstream.close()
        return
    back = threading.Thread(target=copy, args=(upstream, conn), daemon=True)
    back.start()
    copy(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def accept_forever(listener: socket.socket, path: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, path), daemon=True).start()


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(args: list[str]) -> None:
    port, path, dashes, *argv = args
    if dashes != "--" or not argv:
        os.write(2, b"usage: relay.py PORT SOCKET -- PROGRAM [ARG...]\n")
        os._exit(2)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(128)
    try:
        child = os.posix_spawnp(argv[0], argv, os.environ, setsigdef=RESET)
    except OSError as exc:
        os.write(2, f"skydeck: cannot run {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    threading.Thread(target=accept_forever, args=(listener, path), daemon=True).start()
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    os._exit(exit_code(status))


if __name__ == "__main__":
    main(sys.argv[1:])
