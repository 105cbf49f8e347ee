"""Who may call the API, and with which scopes.

- No credential configured: the daemon binds loopback only (enforced at
  start) and everything is open.
- ``SKYDECK_TOKEN``: ``Authorization: Bearer <token>``, compared in constant
  time; a static token holds every scope.
- ``SKYDECK_JWT_SECRET``: HS256 JWTs are accepted too; the space-separated
  ``scope`` claim must hold the route's scope; ``exp``, when present, is
  honoured (pyjwt checks it).
- ``SKYDECK_JWKS_URL``: Parachute hub tokens, RS256 JWTs whose ``kid`` names a
  key of the hub's JWKS (`HubKeys`); ``iss`` must be the hub
  (``SKYDECK_JWT_ISSUER``), ``aud`` ``agent`` (or the legacy ``channel``),
  ``exp`` is required; a legacy ``channel:<verb>`` scope counts as
  ``agent:<verb>`` (parachute-vault.md §6).

The token's header picks the one path that may verify it (HS256 -> the
secret, RS256 -> the hub's keys, anything else -> refused), and each path
allows its one algorithm only: an ``alg: none`` token, or an HS256 token
"signed" with the hub's public key, has nowhere to go.

Every failure looks the same (``401 {"ok": false, "error": "unauthorized"}``),
so a caller learns nothing about which part failed; a valid credential that
lacks the route's scope is a 403. Tokens are never logged.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
import trio

log = logging.getLogger(__name__)

Scope = Literal["agent:read", "agent:send", "agent:write", "agent:admin"]
ALL_SCOPES: frozenset[str] = frozenset({"agent:read", "agent:send", "agent:write", "agent:admin"})

#: Hub tokens are for `agent`; `channel` is the module's older name (parachute-vault.md §6).
HUB_AUDIENCES = ("agent", "channel")
#: How long a fetched key set is trusted, and the least time between two fetches
#: (the hub's own scope guard uses 5 min / 30 s): a flood of tokens with made-up
#: `kid`s costs the hub one request per 30 s, not one per token.
JWKS_TTL_S = 300.0
JWKS_REFRESH_S = 30.0
JWKS_TIMEOUT_S = 5.0


class Unauthorized(Exception):
    """Always rendered as the same ``401 {"ok": false, "error": "unauthorized"}``."""


class Forbidden(Exception):
    """A valid credential without the scope this route needs."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this token lacks the {scope} scope")
        self.scope = scope


def scope_for(method: str, path: str) -> Scope:
    """The scope a route needs (http-api.md, Auth), by the route's shape.

    Matched on path segments, not text: a job named ``run`` (``/api/jobs/run``)
    is written with `agent:write` like any job, and ``/api/jobs/reset`` is no reset.
    """
    parts = path.strip("/").split("/")
    resource = parts[1] if len(parts) > 1 and parts[0] == "api" else None
    if resource == "agents" and len(parts) == 4 and parts[3] == "reset" and method == "POST":
        return "agent:admin"
    if resource == "telegram":
        # A link lets outsiders run an agent (telegram.md T40); pairings list who asked.
        if method in ("GET", "HEAD") and parts[2:3] != ["pairings"]:
            return "agent:read"
        return "agent:admin"
    if resource in ("agents", "jobs"):
        if method in ("GET", "HEAD"):
            return "agent:read"
        if resource == "jobs" and len(parts) == 4 and parts[3] == "run":
            return "agent:send"
        return "agent:write"
    if method in ("GET", "HEAD"):
        return "agent:read"
    return "agent:send"


def granted_scopes(claims: dict[str, Any], *, legacy: bool = False) -> set[str]:
    """The space-separated ``scope`` claim; with ``legacy``, ``channel:x`` grants ``agent:x``."""
    raw = claims.get("scope")
    scopes = set(raw.split()) if isinstance(raw, str) else set()
    if legacy:
        scopes |= {"agent:" + s[len("channel:") :] for s in scopes if s.startswith("channel:")}
    return scopes


def usable_keys(document: object) -> dict[str, Any]:
    """The RS256 signing keys of a JWKS document, by ``kid``.

    Raises `ValueError` when the document is not a key set with at least one
    usable key; keys of another type, algorithm or use, or without a ``kid``,
    are left out (a token naming one of them fails like an unknown ``kid``).
    """
    if not isinstance(document, dict):
        raise ValueError("the JWKS is not a JSON object")
    try:
        jwk_set = jwt.PyJWKSet.from_dict(document)
    except jwt.PyJWTError as exc:
        raise ValueError(str(exc)) from None
    keys = {
        jwk.key_id: jwk.key
        for jwk in jwk_set.keys
        if isinstance(jwk.key_id, str)
        and jwk.algorithm_name == "RS256"
        and jwk.public_key_use in ("sig", None)
    }
    if not keys:
        raise ValueError("the JWKS holds no RS256 signing key with a kid")
    return keys


class HubKeys:
    """The hub's public keys (its JWKS), fetched when needed and cached.

    A token whose ``kid`` is in a key set fetched less than ``ttl_s`` ago is
    checked without any I/O. Otherwise the set is fetched again (httpx, async:
    the event loop never waits on the network), but at most once per
    ``refresh_s`` and by one request at a time; a request that comes while a
    fetch runs waits for it. A failed fetch keeps the keys there were until
    their ``ttl_s`` is over, and never lets a token in: the daemon starts and
    serves while the hub is down, and hub tokens get 401 until it answers.
    """

    def __init__(
        self,
        jwks_url: str,
        issuer: str | None = None,
        *,
        ttl_s: float = JWKS_TTL_S,
        refresh_s: float = JWKS_REFRESH_S,
        timeout_s: float = JWKS_TIMEOUT_S,
    ) -> None:
        self.url = jwks_url
        # The JWKS lives at <hub>/.well-known/jwks.json and `iss` is the hub's origin.
        parts = urlsplit(jwks_url)
        self.issuer = issuer or f"{parts.scheme}://{parts.netloc}"
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = trio.Lock()

    def _cached(self, kid: str, now: float) -> Any | None:
        if self._fetched_at is None or now - self._fetched_at >= self.ttl_s:
            return None
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.refresh_s

    async def key(self, kid: str) -> Any | None:
        """The public key named ``kid``, or None (unknown, or the hub cannot be reached)."""
        if (key := self._cached(kid, trio.current_time())) is not None:
            return key
        async with self._lock:
            now = trio.current_time()
            if (key := self._cached(kid, now)) is not None:
                return key  # fetched while this request waited for the lock
            if not self._may_fetch(now):
                return None
            self._attempted_at = now
            if (keys := await self._fetch()) is not None:
                self._keys, self._fetched_at = keys, now
            return self._cached(kid, now)

    async def _fetch(self) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as http:
                response = await http.get(self.url)
            response.raise_for_status()
            return usable_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning(
                "cannot fetch the hub's JWKS; hub tokens get 401 until it answers",
                extra={"url": self.url, "error": str(exc) or type(exc).__name__},
            )
            return None

    async def verify(self, credential: str, kid: object) -> dict[str, Any]:
        """The claims of a valid hub token; raises `Unauthorized` otherwise."""
        if not isinstance(kid, str) or (key := await self.key(kid)) is None:
            raise Unauthorized()
        try:
            claims: dict[str, Any] = jwt.decode(
                credential,
                key,
                algorithms=["RS256"],
                audience=list(HUB_AUDIENCES),
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            raise Unauthorized() from None
        return claims


class Auth:
    def __init__(
        self,
        token: str | None = None,
        jwt_secret: str | None = None,
        hub: HubKeys | None = None,
    ) -> None:
        self._token = token.encode() if token else None
        self._jwt_secret = jwt_secret or None
        self._hub = hub

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._jwt_secret is not None or self._hub is not None

    def outside_scopes(self, credential: str) -> tuple[frozenset[str], str | None]:
        """An outside MCP client's scopes and ``channel`` claim (mcp.md M10): the
        static token (every scope, any channel) or an HS256 JWT; hub tokens are not
        taken there. Raises `Unauthorized`."""
        if self._token is not None and hmac.compare_digest(credential.encode(), self._token):
            return ALL_SCOPES, None
        if self._jwt_secret is None:
            raise Unauthorized()
        try:
            claims = jwt.decode(credential, self._jwt_secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            raise Unauthorized() from None
        channel = claims.get("channel")
        if channel is not None and not isinstance(channel, str):
            raise Unauthorized()
        return frozenset(granted_scopes(claims)), channel

    async def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise `Unauthorized` or `Forbidden`, or return when the call may go on."""
        if not self.enabled:
            return
        scheme, _, credential = (authorization or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized()
        if self._token is not None and hmac.compare_digest(credential.encode(), self._token):
            return
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise Unauthorized() from None
        alg = header.get("alg")
        if alg == "HS256" and self._jwt_secret is not None:
            try:
                claims = jwt.decode(credential, self._jwt_secret, algorithms=["HS256"])
            except jwt.PyJWTError:
                raise Unauthorized() from None
            granted = granted_scopes(claims)
        elif alg == "RS256" and self._hub is not None:
            claims = await self._hub.verify(credential, header.get("kid"))
            granted = granted_scopes(claims, legacy=True)
        else:
            raise Unauthorized()
        if scope not in granted:
            raise Forbidden(scope)
