"""A fake Parachute Vault: the far side of the network, speaking the note API of
shared/spec/parachute-vault.md §1 with its real shapes and status codes (201 on
create, 409 `path_conflict`, 428 without `if_updated_at`/`force`, 409 on a
stale `if_updated_at`, `if_missing:"create"`, camelCase timestamps, ids like
`2026-06-24-10-31-07-123004`). Scriptable to fail: per-route status bursts,
a whole-vault outage, slow answers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import trio
from quart import request
from quart_trio import QuartTrio

TOKEN = "vault-token-for-tests"
Reply = tuple[dict[str, Any] | list[dict[str, Any]], int]


@dataclass
class FakeVault:
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    failures: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    down: bool = False
    delay_s: float = 0.0
    _clock: datetime = field(default_factory=lambda: datetime(2026, 6, 24, 10, 0, tzinfo=UTC))

    # -- scripting and reading ----------------------------------------------------

    def fail(self, method: str, route: str, *statuses: int) -> None:
        """The next requests of ``method`` on ``route`` ("/notes") answer these statuses."""
        self.failures.setdefault((method, route), []).extend(statuses)

    def add(
        self, content: str, tags: list[str], metadata: dict[str, Any], path: str = ""
    ) -> dict[str, Any]:
        note = self._create(content, path or f"notes/{len(self.notes)}", tags, metadata)
        return note

    def tagged(self, tag: str) -> list[dict[str, Any]]:
        return [n for n in self.notes.values() if tag in n["tags"]]

    def by_path(self, path: str) -> dict[str, Any] | None:
        return next((n for n in self.notes.values() if n["path"].lower() == path.lower()), None)

    def attempts(self, method: str, path_prefix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    # -- note store ---------------------------------------------------------------

    def _now(self) -> str:
        self._clock += timedelta(microseconds=1)
        return self._clock.isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _create(
        self, content: str, path: str, tags: list[str], metadata: dict[str, Any]
    ) -> dict[str, Any]:
        stamp = self._now()
        note_id = self._clock.strftime("%Y-%m-%d-%H-%M-%S-%f")
        note = {
            "id": note_id,
            "content": content,
            "path": path,
            "tags": list(tags),
            "metadata": dict(metadata),
            "createdAt": stamp,
            "updatedAt": stamp,
        }
        self.notes[note_id] = note
        return note

    def _find(self, ref: str) -> dict[str, Any] | None:
        return self.notes.get(ref) or self.by_path(ref)

    # -- the app ------------------------------------------------------------------

    def app(self) -> QuartTrio:
        app = QuartTrio("fake-vault")

        @app.before_request
        async def gate() -> Reply | None:
            body = await request.get_json(silent=True)
            route = "/" + request.path.split("/api/", 1)[-1].split("/")[0]
            self.requests.append((request.method, request.path.split("/api", 1)[-1], body))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return {"error": "unauthorized"}, 401
            if self.delay_s:
                await trio.sleep(self.delay_s)
            if self.down:
                return {"error": "service unavailable"}, 503
            queued = self.failures.get((request.method, route))
            if queued:
                status = queued.pop(0)
                return {"error": "scripted failure", "status": status}, status
            return None

        @app.put("/vault/<vault>/api/tags/<path:tag>")
        async def put_tag(vault: str, tag: str) -> Reply:
            return {"name": unquote(tag)}, 200

        @app.post("/vault/<vault>/api/notes")
        async def create(vault: str) -> Reply:
            body = await request.get_json()
            content, path = body.get("content", ""), body.get("path", "")
            if not content and not path:
                return {"error_type": "empty_note"}, 400
            if path and self.by_path(path):
                return {"error_type": "path_conflict", "path": path}, 409
            return self._create(content, path, body.get("tags", []), body.get("metadata", {})), 201

        @app.get("/vault/<vault>/api/notes")
        async def listing(vault: str) -> Reply:
            tag = request.args.get("tag", "")
            limit = int(request.args.get("limit", "50"))
            found = [
                n
                for n in self.notes.values()
                if any(t == tag or t.startswith(tag + "/") for t in n["tags"])
            ]
            found.sort(key=lambda n: n["createdAt"], reverse=request.args.get("sort") == "desc")
            return [copy.deepcopy(n) for n in found[:limit]], 200

        @app.get("/vault/<vault>/api/notes/<path:ref>")
        async def get_one(vault: str, ref: str) -> Reply:
            note = self._find(unquote(ref))
            return (copy.deepcopy(note), 200) if note else ({"error": "not_found"}, 404)

        @app.patch("/vault/<vault>/api/notes/<path:ref>")
        async def patch(vault: str, ref: str) -> Reply:
            body = await request.get_json()
            note = self._find(unquote(ref))
            if note is None:
                if body.get("if_missing") == "create" and body.get("path"):
                    note = self._create(
                        body.get("content", ""),
                        body["path"],
                        body.get("tags", []),
                        body.get("metadata", {}),
                    )
                    return note, 201
                return {"error": "not_found"}, 404
            if not body.get("force") and "if_updated_at" not in body:
                return {"error_type": "precondition_required"}, 428
            if "if_updated_at" in body and body["if_updated_at"] != note["updatedAt"]:
                return {
                    "error_type": "conflict",
                    "current_updated_at": note["updatedAt"],
                    "your_updated_at": body["if_updated_at"],
                    "note_id": note["id"],
                }, 409
            if "content" in body:
                note["content"] = body["content"]
            note["metadata"].update(body.get("metadata") or {})
            if isinstance(body.get("tags"), dict):
                note["tags"] = [t for t in note["tags"] if t not in body["tags"].get("remove", [])]
                note["tags"] += [t for t in body["tags"].get("add", []) if t not in note["tags"]]
            note["updatedAt"] = self._now()
            return copy.deepcopy(note), 200

        @app.delete("/vault/<vault>/api/notes/<path:ref>")
        async def delete(vault: str, ref: str) -> Reply:
            note = self._find(unquote(ref))
            if note is None:
                return {"error": "not_found"}, 404
            del self.notes[note["id"]]
            return {"ok": True}, 200

        return app
