"""Webhook building blocks without servers: Standard Webhooks signatures (checked against the
spec's own test vector and the official openai SDK), the address guard, the retry policy, the
settings."""

from __future__ import annotations

import random
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from schemas.messages import BatchEvent
from services.supervisor import ensure_webhook_secret
from services.webhook_notifier import sender, service, store
from shared import config, config_sections
from shared.config import WebhookSettings
from shared.domain.webhooks import (
    GuardedResolver,
    UnsafeUrl,
    address_allowed,
    check_url,
    new_secret,
    signature,
    signed_headers,
)


def sdk() -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # From the Standard Webhooks specification's reference libraries.
    got = signature(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_openai_sdk_unwraps_what_we_sign_and_refuses_a_tampered_body() -> None:
    secret = new_secret()
    event = BatchEvent(
        id="evt_1", type="batch.expired", batch_id="batch_1", created_at=1, metadata={"a": "b"}
    )
    body = service.payload(event, event.metadata)
    headers = signed_headers([secret], event.id, int(time.time()), body)
    parsed = sdk().webhooks.unwrap(body, headers, secret=secret)
    assert type(parsed).__name__ == "BatchExpiredWebhookEvent"
    assert (parsed.id, parsed.type, parsed.object, parsed.data.id) == (
        "evt_1", "batch.expired", "event", "batch_1",
    )  # fmt: skip
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.unwrap(body.replace(b"batch_1", b"batch_2"), headers, secret=secret)
    stale = signed_headers([secret], event.id, int(time.time()) - 3600, body)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.unwrap(body, stale, secret=secret)


def test_two_secrets_give_two_signatures_each_of_which_verifies() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"id":"evt_1"}'
    headers = signed_headers([new, old], "evt_1", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        sdk().webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.verify_signature(body, headers, secret=new_secret())


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # link-local: cloud metadata services
        ("100.64.0.1", False),  # shared address space (CGNAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
    ],
)
def test_only_public_unicast_addresses_are_allowed_by_default(address: str, allowed: bool) -> None:
    assert address_allowed(address, ()) is allowed


def test_operator_allowed_networks_open_exactly_those_ranges() -> None:
    allowed = config_sections.parse_networks("X", "127.0.0.0/8, 10.1.0.0/16")
    assert allowed == ("127.0.0.0/8", "10.1.0.0/16")
    assert address_allowed("127.0.0.2", allowed)
    assert address_allowed("::ffff:127.0.0.1", allowed)
    assert address_allowed("10.1.200.3", allowed)
    assert not address_allowed("10.2.0.1", allowed)
    assert not address_allowed("::1", allowed)


async def test_urls_are_checked_by_scheme_and_by_what_their_host_resolves_to() -> None:
    await check_url("http://127.0.0.1:8080/x", ("127.0.0.0/8",))
    for url, needle in [
        ("http://localhost:8080/x", "refused: localhost resolves to"),
        ("https://[::1]/x", "refused: ::1"),
        ("file:///etc/passwd", "scheme"),
        ("http:///nohost", "no host"),
        ("http://a:b@8.8.8.8/", "credentials"),
    ]:
        with pytest.raises(UnsafeUrl, match=needle):
            await check_url(url, ())


async def test_the_connectors_resolver_refuses_a_host_that_resolves_to_loopback() -> None:
    resolver = GuardedResolver(())
    with pytest.raises(UnsafeUrl, match="refused: localhost"):
        await resolver.resolve("localhost", 80)
    await resolver.close()
    # Through aiohttp the refusal is still recognised as one (permanent, not a network error).
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(()))
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(Exception) as raised:
            await session.post("http://localhost:9/x", data=b"{}")
    assert sender._unsafe_cause(raised.value) is not None


def claimed(cycle_attempt: int, cycle_age_s: float = 0.0) -> store.Claimed:
    return store.Claimed(
        id="whd_1", event_id="evt_1", batch_id="batch_1", endpoint_id=None, url="http://x/",
        host="x:80", payload="{}", attempt=cycle_attempt, cycle_attempt=cycle_attempt,
        cycle_age_s=cycle_age_s, secrets=(), endpoint_deleted=False,
    )  # fmt: skip


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = WebhookSettings(backoff_base_s=10, backoff_max_s=300)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (40, 300), (200, 300)]:
        waits = [service.backoff_s(policy, attempt, rng) for _ in range(400)]
        assert all(0 <= w <= ceiling for w in waits)
        # Full jitter spreads over the whole range, not around the ceiling.
        assert min(waits) < ceiling * 0.1 and max(waits) > ceiling * 0.9


def test_next_state_retries_then_dead_letters_on_attempts_or_age() -> None:
    policy = WebhookSettings(max_attempts=3, max_age_s=100, backoff_base_s=1, backoff_max_s=50)
    rng = random.Random(1)
    failed = sender.Outcome(ok=False, status_code=500, error="HTTP 500")
    assert service.next_state(policy, claimed(1), sender.Outcome(ok=True, status_code=204), rng) == (
        "delivered", 0.0, None,
    )  # fmt: skip
    status, wait_s, error = service.next_state(policy, claimed(2), failed, rng)
    assert (status, error) == ("pending", "HTTP 500") and 0 <= wait_s <= 2
    assert service.next_state(policy, claimed(3), failed, rng) == (
        "dead", 0.0, "gave up after 3 attempts; last: HTTP 500",
    )  # fmt: skip
    assert service.next_state(policy, claimed(1, cycle_age_s=100.5), failed, rng)[0] == "dead"
    # Close to the max age, the last retry lands at the max age.
    status, wait_s, _ = service.next_state(
        WebhookSettings(max_attempts=99, max_age_s=100, backoff_base_s=1000, backoff_max_s=1000),
        claimed(5, cycle_age_s=99.0), failed, random.Random(3),
    )  # fmt: skip
    assert status == "pending" and wait_s <= 1.0
    refused = sender.Outcome(ok=False, error="refused: x", permanent=True)
    assert service.next_state(policy, claimed(1), refused, rng) == ("dead", 0.0, "refused: x")


def test_webhook_settings_are_read_from_the_environment() -> None:
    secret = new_secret()
    s = config.load({
        "JETBATCH_WEBHOOK_SECRET": secret,
        "JETBATCH_WEBHOOK_MAX_ATTEMPTS": "7",
        "JETBATCH_WEBHOOK_MAX_AGE_S": "3600",
        "JETBATCH_WEBHOOK_BACKOFF_BASE_S": "0.5",
        "JETBATCH_WEBHOOK_BACKOFF_MAX_S": "60",
        "JETBATCH_WEBHOOK_TIMEOUT_S": "2.5",
        "JETBATCH_WEBHOOK_CONCURRENCY": "8",
        "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST": "2",
        "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,::1",
    }).webhooks  # fmt: skip
    assert s == WebhookSettings(
        secret=secret, max_attempts=7, max_age_s=3600, backoff_base_s=0.5, backoff_max_s=60,
        timeout_s=2.5, concurrency=8, concurrency_per_host=2,
        allowed_networks=("127.0.0.0/8", "::1/128"),
    )  # fmt: skip
    defaults = config.load({}).webhooks
    assert (defaults.secret, defaults.max_attempts, defaults.max_age_s) == (None, 15, 72 * 3600)
    assert defaults.allowed_networks == ()


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"JETBATCH_WEBHOOK_SECRET": "sekrit"}, "must start with whsec_"),
        ({"JETBATCH_WEBHOOK_SECRET": "whsec_!!!"}, "base64"),
        ({"JETBATCH_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "24 to 64 bytes"),
        ({"JETBATCH_WEBHOOK_ALLOWED_NETWORKS": "10.0.0.0/33"}, "not a network"),
        ({"JETBATCH_WEBHOOK_MAX_ATTEMPTS": "0"}, "JETBATCH_WEBHOOK_MAX_ATTEMPTS"),
        ({"JETBATCH_WEBHOOK_TIMEOUT_S": "-1"}, "JETBATCH_WEBHOOK_TIMEOUT_S"),
        (
            {"JETBATCH_WEBHOOK_CONCURRENCY": "2", "JETBATCH_WEBHOOK_CONCURRENCY_PER_HOST": "4"},
            "CONCURRENCY_PER_HOST",
        ),
    ],
)
def test_bad_webhook_settings_fail_before_anything_starts(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        config.load(env)


def test_an_oversized_event_is_dead_lettered_at_once_not_sent() -> None:
    scheduler = service.Scheduler(pool=None, policy=WebhookSettings(secret=new_secret()))  # type: ignore[arg-type]
    metadata = {"webhook_url": "https://example.com/hook", "blob": "x" * (70 * 1024)}
    event = BatchEvent(id="evt_1", type="batch.completed", batch_id="b", created_at=1)
    [row] = scheduler._rows(event, metadata, [], now=5)
    status, dead_at, error = row[9], row[11], row[12]
    assert (status, dead_at) == ("dead", 5)
    assert error is not None and "over the 65536-byte limit" in error


def test_a_bad_batch_webhook_url_is_dead_lettered_with_the_reason() -> None:
    scheduler = service.Scheduler(pool=None, policy=WebhookSettings(secret=new_secret()))  # type: ignore[arg-type]
    event = BatchEvent(id="evt_1", type="batch.completed", batch_id="b", created_at=1)
    endpoints = [
        store.EndpointRow("we_1", "https://a.example/h", ("batch.completed",)),
        store.EndpointRow("we_2", "https://b.example/h", ("batch.failed",)),
    ]
    rows = scheduler._rows(event, {"webhook_url": "gopher://x"}, endpoints, now=5)
    assert [(r[4], r[9]) for r in rows] == [("we_1", "pending"), ("batch_url", "dead")]
    assert "scheme must be http or https" in (rows[1][12] or "")


def test_jetbatch_up_generates_a_webhook_secret_once_and_keeps_it(tmp_path: Path) -> None:
    settings = config.load({"JETBATCH_DATA_DIR": str(tmp_path)})
    secret = ensure_webhook_secret(settings)
    assert config_sections.check_webhook_secret("generated", secret) == secret
    saved = tmp_path / "webhook-secret"
    assert saved.read_text().strip() == secret
    assert saved.stat().st_mode & 0o777 == 0o600
    assert ensure_webhook_secret(settings) == secret  # the next `jetbatch up` signs the same way
    mine = new_secret()
    configured = config.load({"JETBATCH_DATA_DIR": str(tmp_path), "JETBATCH_WEBHOOK_SECRET": mine})
    assert ensure_webhook_secret(configured) == mine
