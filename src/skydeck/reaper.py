"""The per-process reaper: runs one program and makes sure nothing it started outlives it.

    reaper.main([CONTROL_FD, PROGRAM, ARG, ...])     (see procs.under_reaper)

skydeck starts every backend process through this shim (`procs.under_reaper`).
A process group alone does not contain a program: a child that calls
``setsid`` leaves the group, and once its parent exits it is re-parented to
init, out of reach. So the shim

- marks itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): every
  orphan in the tree is re-parented to the shim instead of init, so the whole
  tree stays findable as the shim's descendants, whatever sessions they made;
- spawns PROGRAM as its only child (same process group, stdin/stdout/stderr
  inherited, signal dispositions reset) and then lets go of those pipes, so
  only the program's own processes hold them;
- when PROGRAM exits, SIGKILLs every remaining descendant and exits with
  PROGRAM's status (a death by signal N is re-raised as a death by signal N),
  so the daemon sees the turn end when the program ends, not when the last
  holder of stdout goes away;
- when CONTROL_FD (a pipe whose write end only the daemon holds) reaches EOF,
  terminates the tree: SIGTERM to the process group, up to `TERM_GRACE_S` for
  PROGRAM to exit, then SIGKILL for every descendant. The daemon closes its end
  to stop a turn; the kernel closes it when the daemon dies, even by SIGKILL.
  (``PR_SET_PDEATHSIG`` would not do: it fires when the *thread* that forked
  us exits, and Trio forks from worker threads that come and go.)

The shim ignores SIGTERM, SIGINT and SIGHUP, so a program's ``kill 0`` (a
shell's ``trap 'kill 0' EXIT``) cannot take down its own reaper.

Killing is race-free with respect to pid reuse: the shim only ever signals its
*direct* children, whose pids cannot be reused before it reaps them. Killing a
child re-parents the child's own children to the shim, so repeating "kill
every direct child, reap" empties the tree level by level.

Standard library only, started with ``-I -S``: its start-up is part of every
turn (see docs/design.md). It is imported rather than run as a script, so its
bytecode comes from ``__pycache__`` instead of being compiled each time, and it
uses the C module ``_signal``, since ``signal`` imports ``enum`` (3-4 ms each).
Nothing in skydeck imports it.
"""

from __future__ import annotations

import _signal as signal
import ctypes
import os
import select
import time

PR_SET_CHILD_SUBREAPER = 36
#: How long PROGRAM gets to exit after SIGTERM (the daemon waits 3 s for us).
TERM_GRACE_S = 2.0
#: A tree that will not die (uninterruptible sleep) does not hold the turn longer.
KILL_DEADLINE_S = 5.0
IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Reset to the default in PROGRAM: ours, and the ones Python itself ignores.
RESET = (*IGNORED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)


class Reaper:
    def __init__(self, control: int) -> None:
        self.control = control
        self.me = os.getpid()
        self.main = 0
        self.status: int | None = None
        # SIGCHLD writes a byte here, so one select() sees children and the daemon.
        self.wake, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        for signum in IGNORED:
            signal.signal(signum, signal.SIG_IGN)

    def spawn(self, argv: list[str]) -> None:
        self.main = os.posix_spawnp(argv[0], argv, os.environ, setsigdef=RESET)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    def run(self) -> int:
        """Wait for PROGRAM or the daemon, clean the tree up, return PROGRAM's status."""
        while self.status is None:
            ready, _, _ = select.select([self.wake, self.control], [], [])
            self._drain_wake()
            self._reap()
            if self.status is None and self.control in ready and not os.read(self.control, 1):
                self._terminate()
                break
        self._kill_all()
        # Not reaped by the deadline (stuck in the kernel): report it as killed.
        return signal.SIGKILL if self.status is None else self.status

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> bool:
        """Reap every exited child; False once we have no children at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.main:
                self.status = status

    def _terminate(self) -> None:
        os.killpg(0, signal.SIGTERM)  # our own group: PROGRAM and helpers that stayed in it
        deadline = time.monotonic() + TERM_GRACE_S
        while self.status is None and (left := deadline - time.monotonic()) > 0:
            select.select([self.wake], [], [], left)
            self._drain_wake()
            self._reap()

    def _kill_all(self) -> None:
        deadline = time.monotonic() + KILL_DEADLINE_S
        while self._reap() and time.monotonic() < deadline:
            for pid in self._children():
                try:  # noqa: SIM105 (contextlib would cost start-up time)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            select.select([self.wake], [], [], 0.05)
            self._drain_wake()

    def _children(self) -> list[int]:
        """Our direct children, from /proc (``task/*/children`` needs a kernel option)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.me:
                found.append(int(entry))
        return found


def exit_like(status: int) -> None:
    """Exit the way PROGRAM did: the same exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # PROGRAM dumped its own
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def main(args: list[str]) -> None:
    control = int(args[0])
    os.set_inheritable(control, False)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    reaper = Reaper(control)
    try:
        reaper.spawn(args[1:])
    except OSError as exc:
        os.write(2, f"skydeck: cannot run {args[1]}: {exc.strerror}\n".encode())
        os._exit(127)
    exit_like(reaper.run())
