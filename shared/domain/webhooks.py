"""Outbound webhook plumbing shared by the api (checks a URL when an endpoint is registered) and
the webhook notifier (signs and sends): Standard Webhooks signatures and the guard that keeps
deliveries off loopback, private, link-local and other non-public addresses.

Signature (https://www.standardwebhooks.com, as OpenAI sends it): headers `webhook-id`,
`webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of a `whsec_...` secret; several
space-separated signatures while a rotated secret is still honoured.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    """What an endpoint shows instead of its secret."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets_),
    }


# The URL guard -------------------------------------------------------------------------------


class UnsafeUrl(Exception):
    """A destination jetbatch refuses to send to. Permanent: retrying does not help."""


@functools.lru_cache(maxsize=64)
def _networks(allowed: tuple[str, ...]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allowed)


def address_allowed(address: str | IpAddress, allowed: Iterable[str]) -> bool:
    """Public unicast addresses, and any address inside an operator-allowed network (CIDR)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        if ip.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
            ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in _networks(tuple(allowed))):
        return True
    # is_global is False for loopback, private (RFC 1918, ULA), link-local, shared (CGNAT),
    # reserved, documentation and unspecified addresses.
    return ip.is_global and not ip.is_multicast


def check_address(host: str, address: str, allowed: Iterable[str]) -> None:
    if not address_allowed(address, allowed):
        raise UnsafeUrl(
            f"refused: {host} resolves to {address}, a loopback, private, link-local or otherwise "
            "non-public address (allow it with JETBATCH_WEBHOOK_ALLOWED_NETWORKS)"
        )


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, or UnsafeUrl."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UnsafeUrl(f"invalid URL {url!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrl(f"invalid URL {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise UnsafeUrl(f"invalid URL {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl(f"invalid URL {url!r}: credentials in the URL are not allowed")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def host_key(url: str) -> str:
    """host:port, the unit of per-host concurrency."""
    try:
        _, host, port = parse_url(url)
    except UnsafeUrl:
        return ""
    return f"{host}:{port}"


def _ip_literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def check_url(url: str, allowed: Iterable[str], *, resolve_timeout_s: float = 5) -> None:
    """Raise UnsafeUrl unless `url` is http(s) and every address its host resolves to is allowed.

    A host that does not resolve raises OSError (a transient failure, not a refusal)."""
    allowed = tuple(allowed)
    _, host, port = parse_url(url)
    literal = _ip_literal(host)
    if literal is not None:
        check_address(host, str(literal), allowed)
        return
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), resolve_timeout_s
    )
    for info in infos:
        check_address(host, str(info[4][0]), allowed)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a host if any address it resolves to is not allowed. The
    connection goes to exactly the addresses checked here, so a DNS answer that changes between
    `check_url` and the connection (DNS rebinding) cannot reach a private address. (aiohttp does
    not ask the resolver about IP literals: `check_url` covers those.)"""

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = tuple(allowed)
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(host, result["host"], self._allowed)
        return results

    async def close(self) -> None:
        await self._inner.close()
