"""Parachute hub tokens: RS256 JWTs checked against a JWKS the test serves on loopback.

The JWKS is a real HTTP server (stdlib, in a thread, so it answers whether or
not the test's Trio loop is busy, and a `skydeck serve` process can reach it
too); the keys are RSA keys made here with `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from daemon_process import DaemonProcess
from skydeck.service import ConfigError, Service, Settings

ISSUER = "https://hub.parachute.test"
UNAUTHORIZED = {"ok": False, "error": "unauthorized"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request held at the gate never blocks stop()


class JwksServer:
    """Serves ``document`` as JSON at ``url`` (None: a 500); counts requests in ``hits``.

    ``gate`` cleared holds every answer until it is set again: a hub that hangs.
    """

    def __init__(self) -> None:
        self.document: dict[str, Any] | None = {"keys": []}
        self.hits = 0
        self.gate = threading.Event()
        self.gate.set()
        self.port = 0
        self.start()

    def start(self) -> None:
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.hits += 1
                jwks.gate.wait(30)
                if jwks.document is None:
                    self.send_error(500)
                    return
                body = json.dumps(jwks.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        # The same port again after stop(): the hub comes back where it was.
        self.httpd = _Server(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def publish(self, *keys: tuple[str, rsa.RSAPrivateKey]) -> None:
        self.document = {"keys": [public_jwk(kid, key) for kid, key in keys]}


def public_jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture
def jwks(key_a: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.publish(("a", key_a))
    yield server
    server.gate.set()
    server.stop()


def hub_token(
    key: rsa.RSAPrivateKey,
    kid: str | None = "a",
    *,
    scope: str = "agent:read",
    iss: str | None = ISSUER,
    aud: str | None = "agent",
    expires_in: float | None = 300,
) -> str:
    claims = {
        "sub": "user-1",
        "client_id": "test",
        "scope": scope,
        "iss": iss,
        "aud": aud,
        "exp": None if expires_in is None else int(time.time() + expires_in),
    }
    headers = {"kid": kid} if kid is not None else {}
    payload = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(payload, key, algorithm="RS256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], hs256_secret: bytes | None) -> str:
    """A token pyjwt would refuse to make: ``alg: none``, or HS256 keyed by a public key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if hs256_secret is None:
        return signing_input + "."
    mac = hmac.new(hs256_secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def good_claims(scope: str = "agent:read") -> dict[str, Any]:
    return {"iss": ISSUER, "aud": "agent", "scope": scope, "exp": int(time.time() + 300)}


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def hub_daemon(
    tmp_path: Path, jwks: JwksServer, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A real service on a loopback port that takes hub tokens from ``jwks``."""
    settings = {"jwt_issuer": ISSUER, "jwks_refresh_s": 0.2, **settings}
    service = Service(
        Settings(port=0, data_dir=tmp_path / f"data-{uuid.uuid4()}", jwks_url=jwks.url, **settings)
    )
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield http
        service.stop()


async def test_a_hub_token_is_accepted_and_its_keys_cached(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks) as http:
        assert jwks.hits == 0, "nothing is fetched before a hub token arrives"
        for _ in range(3):
            response = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
            assert response.status_code == 200, response.text
        assert jwks.hits == 1, "the key set is fetched once, then cached"


async def test_bad_hub_tokens_get_the_uniform_401(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    header = {"typ": "JWT", "kid": "a"}
    bad = {
        "wrong issuer": hub_token(key_a, iss="https://evil.test"),
        "no issuer": hub_token(key_a, iss=None),
        "wrong audience": hub_token(key_a, aud="vault"),
        "no audience": hub_token(key_a, aud=None),
        "expired": hub_token(key_a, expires_in=-60),
        "no exp": hub_token(key_a, expires_in=None),
        "signed by another key": hub_token(key_b, kid="a"),
        "no kid": hub_token(key_a, kid=None),
        "unknown kid": hub_token(key_a, kid="nope"),
        "alg none": forged({**header, "alg": "none"}, good_claims(), None),
        "HS256 keyed by the public PEM": forged(
            {**header, "alg": "HS256"}, good_claims(), public_pem(key_a)
        ),
        "not a JWT": "a.b.c",
    }
    # A secret configured too, so the HS256 path exists: the PEM still is not its key.
    async with hub_daemon(tmp_path, jwks, jwt_secret="hs-secret-0123456789abcdefghijklmn") as http:
        good = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
        assert good.status_code == 200, good.text
        for case, token in bad.items():
            response = await http.get("/api/agents", headers=bearer(token))
            assert (response.status_code, response.json()) == (401, UNAUTHORIZED), case


async def test_a_rotated_key_is_fetched_and_the_retired_one_refused(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks) as http:
        assert (await http.get("/api/agents", headers=bearer(hub_token(key_a)))).status_code == 200
        jwks.publish(("b", key_b))  # the hub rotates: b in, a out
        await trio.sleep(0.3)  # past jwks_refresh_s
        rotated = await http.get("/api/agents", headers=bearer(hub_token(key_b, kid="b")))
        assert rotated.status_code == 200, "an unknown kid refreshes the key set"
        retired = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
        assert retired.status_code == 401
        assert jwks.hits == 2


async def test_unknown_kids_cannot_hammer_the_hub(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks, jwks_refresh_s=30) as http:
        statuses: list[int] = []

        async def random_kid() -> None:
            token = hub_token(key_a, kid=str(uuid.uuid4()))
            statuses.append((await http.get("/api/agents", headers=bearer(token))).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(random_kid)
        for _ in range(20):
            await random_kid()
        assert statuses == [401] * 40
        assert jwks.hits == 1, "one fetch for 40 unknown kids, concurrent or not"
        ok = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
        assert ok.status_code == 200 and jwks.hits == 1, "the known kid needs no fetch"


async def test_a_hub_outage_lets_no_token_in_and_the_daemon_recovers(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    jwks.stop()
    async with hub_daemon(tmp_path, jwks, jwks_ttl_s=1.5) as http:
        token = hub_token(key_a)
        down = await http.get("/api/agents", headers=bearer(token))
        assert (down.status_code, down.json()) == (401, UNAUTHORIZED), "starts with the hub down"
        jwks.start()
        jwks.document = None  # up, but answering 500
        await trio.sleep(0.3)  # past jwks_refresh_s
        broken = await http.get("/api/agents", headers=bearer(token))
        assert broken.status_code == 401 and jwks.hits == 1
        jwks.publish(("a", key_a))
        await trio.sleep(0.3)
        assert (await http.get("/api/agents", headers=bearer(token))).status_code == 200
        fetched = trio.current_time()
        jwks.stop()  # down again, with the keys cached
        await trio.sleep(0.3)
        unknown = await http.get("/api/agents", headers=bearer(hub_token(key_a, kid="z")))
        assert unknown.status_code == 401
        cached = await http.get("/api/agents", headers=bearer(token))
        assert cached.status_code == 200, "keys fetched under jwks_ttl_s ago still count"
        await trio.sleep_until(fetched + 1.6)
        expired = await http.get("/api/agents", headers=bearer(token))
        assert expired.status_code == 401, "past the TTL, an unreachable hub lets nothing in"


async def test_a_hanging_hub_never_blocks_the_event_loop(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks) as http:
        jwks.gate.clear()
        statuses: list[int] = []

        async def hub_request() -> None:
            response = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub_request)
            while jwks.hits == 0:
                await trio.sleep(0.01)
            with trio.fail_after(2):
                assert (await http.get("/health")).status_code == 200
            assert statuses == [], "the hub-token request waits for the JWKS"
            jwks.gate.set()
        assert statuses == [200]


async def test_legacy_channel_scopes_count_as_agent_scopes(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks) as http:
        for aud in ("agent", "channel"):
            token = hub_token(key_a, scope="channel:send", aud=aud)
            sent = await http.post(
                "/api/channels/ops/messages", json={"content": "hi"}, headers=bearer(token)
            )
            assert sent.status_code == 200, (aud, sent.text)
            read = await http.get("/api/agents", headers=bearer(token))
            assert read.status_code == 403, "channel:send grants agent:send only"


async def test_a_hub_token_without_the_routes_scope_is_403(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks) as http:
        token = hub_token(key_a, scope="agent:read vault:work:write")
        assert (await http.get("/api/agents", headers=bearer(token))).status_code == 200
        response = await http.post(
            "/api/channels/ops/messages", json={"content": "hi"}, headers=bearer(token)
        )
        assert response.status_code == 403
        assert response.json() == {"ok": False, "error": "this token lacks the agent:send scope"}


async def test_the_issuer_defaults_to_the_jwks_origin(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    async with hub_daemon(tmp_path, jwks, jwt_issuer=None) as http:
        origin = f"http://127.0.0.1:{jwks.port}"
        own = await http.get("/api/agents", headers=bearer(hub_token(key_a, iss=origin)))
        assert own.status_code == 200
        other = await http.get("/api/agents", headers=bearer(hub_token(key_a)))
        assert other.status_code == 401


def test_a_jwks_url_secures_a_public_bind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SKYDECK_JWKS_URL"):
        Settings(host="0.0.0.0", data_dir=tmp_path).check()
    Settings(host="0.0.0.0", data_dir=tmp_path, jwks_url="https://hub.test/jwks.json").check()


def test_skydeck_serve_takes_hub_tokens_from_its_environment(
    tmp_path: Path, jwks: JwksServer, key_a: rsa.RSAPrivateKey
) -> None:
    daemon = DaemonProcess(
        tmp_path / "data", env={"SKYDECK_JWKS_URL": jwks.url, "SKYDECK_JWT_ISSUER": ISSUER}
    )
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as http:
            assert http.get("/api/agents").status_code == 401, "secured: no token, no entry"
            good = http.get("/api/agents", headers=bearer(hub_token(key_a)))
            assert good.status_code == 200, good.text
            confused = forged(
                {"typ": "JWT", "alg": "HS256", "kid": "a"}, good_claims(), public_pem(key_a)
            )
            attack = http.get("/api/agents", headers=bearer(confused))
            assert (attack.status_code, attack.json()) == (401, UNAUTHORIZED)
    finally:
        assert daemon.stop() == 0
