"""Browser-borne requests: which Host, Origin and Content-Type the daemon answers.

Why a loopback daemon without a token still needs this: any web page the
owner opens can send requests to ``127.0.0.1``. A "simple" cross-site POST
(``Content-Type: text/plain``, ``mode: "no-cors"``) needs no CORS preflight,
so without these rules a page could create a ``command`` agent and run it. And
through DNS rebinding (``evil.example`` re-pointed at 127.0.0.1) a page can
even read the answers, since the browser then thinks the daemon is
same-origin with the page; only the ``Host`` header gives that away.

So, for every request:

- a ``Host`` that is not a loopback name or address, nor one the owner
  allowed, is refused with 421 (the DNS-rebinding defence);
- on the API and ``/metrics``, an ``Origin`` other than the daemon's own (or
  one the owner allowed), or ``Sec-Fetch-Site: cross-site``, is refused with
  403 — programs that are not browsers (the CLI, webhooks) send neither;
- a JSON route accepts only ``Content-Type: application/json``, which a page
  cannot send cross-site without a preflight that this daemon never grants.

Pure decisions, no I/O: the HTTP layer feeds the headers in and renders the
`Refusal`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Response headers for every answer (the web UI has no inline script or style).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

JSON_MEDIA_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str


MISDIRECTED = Refusal(421, "this daemon does not answer for that Host header")
CROSS_ORIGIN = Refusal(403, "cross-origin requests are refused")
NOT_JSON = Refusal(415, f"send Content-Type: {JSON_MEDIA_TYPE}")


def split_host(host: str) -> tuple[str, str | None]:
    """``"[::1]:1941"`` -> ``("::1", "1941")``; names are lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        return name, port or None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, port
    return host, None


def is_loopback(name: str) -> bool:
    """A loopback host name or address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin_of(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """The hosts and origins the owner allowed beyond loopback and same-origin.

    A host entry without a port matches that name on any port; with a port,
    only that pair.
    """

    hosts: frozenset[str] = frozenset()
    origins: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        *,
        bind_host: str,
        public_url: str | None = None,
        hosts: Iterable[str] = (),
        origins: Iterable[str] = (),
    ) -> OriginPolicy:
        """Allowed hosts: the listed ones, plus a non-loopback bind address and
        the public URL's host; allowed origins: the listed ones and the public URL's."""
        host_set = {entry.strip().lower() for entry in hosts if entry.strip()}
        origin_set = {_origin_of(entry) for entry in origins if entry.strip()}
        bind_name, _ = split_host(bind_host)
        if not is_loopback(bind_name):
            host_set.add(bind_name)
        if public_url:
            host_set.add(split_host(urlsplit(public_url).netloc)[0])
            origin_set.add(_origin_of(public_url))
        return cls(hosts=frozenset(host_set), origins=frozenset(origin_set))

    def host_allowed(self, host: str | None) -> bool:
        """A request without a Host header is no browser's: it passes."""
        if host is None:
            return True
        name, port = split_host(host)
        if is_loopback(name) or name in self.hosts:
            return True
        return port is not None and f"{name}:{port}" in self.hosts

    def check(
        self,
        *,
        path: str,
        scheme: str,
        host: str | None,
        origin: str | None,
        fetch_site: str | None,
    ) -> Refusal | None:
        """The refusal for a request, or None when it may go on to auth."""
        if not self.host_allowed(host):
            return MISDIRECTED
        if not (path.startswith("/api/") or path in ("/api", "/metrics")):
            return None
        if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
            return CROSS_ORIGIN
        if origin is None:
            return None
        origin = origin.strip().lower()
        if host is not None and origin == f"{scheme}://{host.strip().lower()}":
            return None
        return None if origin in self.origins else CROSS_ORIGIN


def is_json(content_type: str | None) -> bool:
    """``application/json``, parameters (a charset) allowed."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == JSON_MEDIA_TYPE
