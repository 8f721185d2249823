"""One signed webhook POST and what came of it. Never raises for anything the receiver or the
network does: every way an attempt can end is an Outcome, to be recorded.

Safety: the URL must be http(s) and resolve only to allowed addresses (shared.domain.webhooks), checked
before the request and again by the connector's resolver; redirects are never followed (a 3xx
is a failed attempt); at most MAX_RESPONSE_BYTES of the answer are read; one timeout covers the
whole attempt; no cookies, no proxies from the environment, no decompression of the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from shared.domain.webhooks import GuardedResolver, UnsafeUrl, check_url, signed_headers

USER_AGENT = "jetbatch-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024  # read for the error message; the rest is dropped unread
ERROR_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    latency_ms: int | None = None
    # Retrying cannot help (unsafe URL, nothing to sign with): dead-letter at once.
    permanent: bool = False


def new_session(
    *, allowed: Iterable[str], concurrency: int, concurrency_per_host: int
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allowed),
        limit=concurrency,
        limit_per_host=concurrency_per_host,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


def _unsafe_cause(exc: BaseException) -> UnsafeUrl | None:
    """The resolver's refusal, wherever aiohttp wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UnsafeUrl):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    msg_id: str,
    secrets: Sequence[str],
    allowed: Iterable[str],
    timeout_s: float,
) -> Outcome:
    started = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    if not secrets:
        return Outcome(ok=False, error="no signing secret", permanent=True)
    try:
        async with asyncio.timeout(timeout_s):
            await check_url(url, allowed, resolve_timeout_s=timeout_s)
            # Signed per attempt: receivers reject an old timestamp (the SDK: after 5 minutes).
            headers = signed_headers(secrets, msg_id, int(time.time()), body)
            headers["Content-Type"] = "application/json"
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                snippet = await resp.content.read(MAX_RESPONSE_BYTES)
                status = resp.status
                location = resp.headers.get("Location", "")
    except UnsafeUrl as e:
        return Outcome(ok=False, error=str(e), permanent=True)
    except TimeoutError:
        return Outcome(ok=False, error=f"timed out after {timeout_s:g}s", latency_ms=elapsed_ms())
    except (aiohttp.ClientError, OSError) as e:
        unsafe = _unsafe_cause(e)
        if unsafe is not None:
            return Outcome(ok=False, error=str(unsafe), permanent=True)
        if isinstance(e, OSError) and not isinstance(e, aiohttp.ClientError):
            error = f"could not resolve {url!r}: {e}"  # from check_url's lookup
        else:
            error = f"{type(e).__name__}: {e}"
        return Outcome(ok=False, error=error, latency_ms=elapsed_ms())
    except UnicodeError as e:  # an IDN host that does not encode
        return Outcome(ok=False, error=f"invalid URL {url!r}: {e}", permanent=True)
    latency = elapsed_ms()
    if 200 <= status < 300:
        return Outcome(ok=True, status_code=status, latency_ms=latency)
    if 300 <= status < 400:
        error = f"HTTP {status}: redirect to {location[:ERROR_SNIPPET_CHARS]!r} not followed"
    else:
        text = snippet.decode("utf-8", "replace").strip()[:ERROR_SNIPPET_CHARS]
        error = f"HTTP {status}" + (f": {text}" if text else "")
    return Outcome(ok=False, status_code=status, error=error, latency_ms=latency)
