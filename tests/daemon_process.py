"""A real `skydeck serve` process for tests that need one (CLI, kill -9)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SKYDECK = str(Path(sys.executable).parent / "skydeck")
PRIVATE = ("ANTHROPIC_", "CLAUDE_CODE_", "SKYDECK_")


def clean_env() -> dict[str, str]:
    """The machine's environment without credentials or skydeck settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE)}


class DaemonProcess:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir.parent / f"{data_dir.name}-daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [SKYDECK, "serve", "--port", "0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=self.log,
            # TEST_DAEMON_LOG=INFO keeps the daemon's full log next to the test's data dir.
            env={
                **clean_env(),
                "SKYDECK_LOG_LEVEL": os.environ.get("TEST_DAEMON_LOG", "WARNING"),
                **(env or {}),
            },
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            if match := re.search(r"API:\s+(http://\S+)/api", line):
                return match.group(1)
        self.kill()
        raise RuntimeError(f"daemon did not start; see {self.log.name}")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, like a crash or the OOM killer."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        return code


def serve_once(data_dir: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`skydeck serve` on ``data_dir``, for a start expected to give up (exit 2)."""
    return subprocess.run(
        [SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


def cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SKYDECK, "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
