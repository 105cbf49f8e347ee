"""The ledger: every move of a message or thread record, allowed or not, and
the rule that state names are spelled in ledger.py only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from skydeck import ledger
from skydeck.ledger import (
    MESSAGE_MOVES,
    THREAD_MOVES,
    AgentStatus,
    IllegalMove,
    MessageState,
    ThreadStatus,
)
from skydeck.model import Message, ThreadRecord

SRC = Path(ledger.__file__).parent

#: The moves the life of a message allows, written out once more by hand, so the
#: table in ledger.py cannot drift without this test noticing.
ALLOWED = {
    ("buffered", "queued"),  # an agent registers (R7)
    ("buffered", "dropped"),  # over the cap (R7)
    ("queued", "working"),  # a turn starts (R12)
    ("queued", "buffered"),  # deregister (R26)
    ("queued", "cancelled"),  # a turn stopped before it started (R9, R26)
    ("working", "working"),  # a restart re-runs it (R28); a mirror has not landed yet
    ("working", "done"),
    ("working", "failed"),
    ("working", "cancelled"),
    ("failed", "done"),  # a late delivery (R21)
}
THREAD_ALLOWED = {
    ("working", "working"),  # a restart re-runs the turn the conversation was in (R28)
    ("working", "ok"),
    ("working", "error"),
    ("ok", "working"),  # the next turn of a single-threaded conversation (R4)
    ("ok", "error"),  # R21: the mirror refused the stored reply for good
    ("error", "working"),
    ("error", "ok"),  # a late delivery (R21)
}


def message(state: MessageState) -> Message:
    return Message(
        id="m", seq=1, channel="c", direction="in", content="x", state=state, created_at="t"
    )


@pytest.mark.parametrize("source", list(MessageState))
@pytest.mark.parametrize("target", list(MessageState))
def test_every_message_move_is_allowed_or_raises(
    source: MessageState, target: MessageState
) -> None:
    if (source.value, target.value) in ALLOWED:
        (after,) = ledger.moved([message(source)], target, "why")
        assert (after.state, after.error) == (target, "why")
    else:
        with pytest.raises(IllegalMove):
            ledger.moved([message(source)], target)


@pytest.mark.parametrize("source", list(ThreadStatus))
@pytest.mark.parametrize("target", list(ThreadStatus))
def test_every_thread_move_is_allowed_or_raises(source: ThreadStatus, target: ThreadStatus) -> None:
    thread = ThreadRecord(
        id="t", channel="c", agent="a", mode="single-threaded", status=source, input="x"
    )
    if (source.value, target.value) in THREAD_ALLOWED:
        assert ledger.thread_moved(thread, target, output="o").status == target
    else:
        with pytest.raises(IllegalMove):
            ledger.thread_moved(thread, target)


def test_the_tables_are_exactly_the_written_rules() -> None:
    table = {(s.value, t.value) for s, targets in MESSAGE_MOVES.items() for t in targets}
    assert table == ALLOWED
    threads = {(s.value, t.value) for s, targets in THREAD_MOVES.items() for t in targets}
    assert threads == THREAD_ALLOWED


def test_moves_return_new_records_and_leave_inputs_alone() -> None:
    original = message(MessageState.QUEUED)
    (after,) = ledger.started([original], "thread-1")
    assert (after.state, after.attempts, after.thread_id) == ("working", 1, "thread-1")
    assert (original.state, original.attempts, original.thread_id) == ("queued", 0, None)


def test_a_terminal_message_never_moves_again() -> None:
    for state in ledger.TERMINAL_STATES - {MessageState.FAILED}:
        assert MESSAGE_MOVES[state] == frozenset(), state


#: Thread statuses `ok` and `error` are left out: they also spell every answer's JSON
#: keys (`{"ok": false, "error": ...}`); `working` is in, through the other two.
STATE_WORDS = {s.value for vocabulary in (MessageState, AgentStatus) for s in vocabulary}
SQL_QUOTED = re.compile(r"'([a-z]+)'")
#: Other vocabularies that share spellings (the event kinds `queued` and `done`, a
#: warm process that is `idle`), each defined once, as an enum of its own.
OTHER_VOCABULARIES = {
    ("model.py", "EventKind"),
    ("backends/claude_warm.py", "WarmState"),
    ("backends/claude_warm.py", "Ending"),
}


def literals_outside_the_ledger(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == "ledger.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        allowed_nodes: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and (relative, node.name) in OTHER_VOCABULARIES:
                allowed_nodes.update(id(child) for child in ast.walk(node))
            # JSON field names that share a spelling (`{"queued": 3}`, `agent["queued"]`).
            elif isinstance(node, ast.Dict):
                allowed_nodes.update(id(key) for key in node.keys if key is not None)
            elif isinstance(node, ast.Subscript):
                allowed_nodes.add(id(node.slice))
        for node in ast.walk(tree):
            if id(node) in allowed_nodes or not isinstance(node, ast.Constant):
                continue
            if not isinstance(node.value, str):
                continue
            # A state as a whole string, or quoted inside SQL text.
            hits = ({node.value} | set(SQL_QUOTED.findall(node.value))) & STATE_WORDS
            if hits:
                found.append(f"{relative}:{node.lineno}: {sorted(hits)} in {node.value!r}")
    return found


def test_no_state_literal_outside_the_ledger() -> None:
    """SQL included: a state in a query is a bound parameter taken from the ledger."""
    assert literals_outside_the_ledger(SRC) == []


def test_the_literal_scan_sees_planted_literals(tmp_path: Path) -> None:
    (tmp_path / "ledger.py").write_text("A = 'done'\n")
    (tmp_path / "x.py").write_text(
        "x = 'done'\ny = \"SELECT 1 FROM m WHERE state IN ('queued','x')\"\nz = 'turn failed'\n"
        "w = {'queued': 1}['queued']\n"
    )
    found = literals_outside_the_ledger(tmp_path)
    assert [line.split(": ")[0] for line in found] == ["x.py:1", "x.py:2"], found


def test_the_error_tree_and_its_http_statuses() -> None:
    """errors.py's tree, mapped to statuses in app.py only (issue 13)."""
    from skydeck import errors
    from skydeck.app import status_of

    expected = {
        errors.BadRequest("x"): 400,
        errors.CursorError("x"): 400,
        errors.InvalidNote("x"): 400,
        errors.NotFound("x"): 404,
        errors.Conflict("x"): 409,
        errors.Unavailable("x"): 503,
        errors.FencedOut("c", 1): 503,
        errors.Stale("x"): 409,
        errors.StoreFailure("disk full"): 507,
        errors.StoreUnreachable("x"): 503,
        errors.BackendError("x"): 500,
        errors.DeliveryError("x"): 500,
    }
    assert {type(e).__name__: status_of(e) for e in expected} == {
        type(e).__name__: s for e, s in expected.items()
    }
    branches = {
        errors.InputError: {errors.BadRequest, errors.CursorError, errors.InvalidNote},
        errors.StateError: {
            errors.NotFound,
            errors.Conflict,
            errors.Unavailable,
            errors.FencedOut,
            errors.Stale,
        },
        errors.ExternalError: {errors.BackendError, errors.DeliveryError, errors.StoreFailure},
    }
    for branch, leaves in branches.items():
        assert set(branch.__subclasses__()) == leaves
        assert issubclass(branch, errors.SkydeckError)
    assert not any(hasattr(kind, "status") for kind in (errors.NotFound, errors.StoreFailure))
