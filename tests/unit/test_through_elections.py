"""Start-up calls to JetStream are asked again while a cluster elects a leader (timeouts, 503),
with the one backoff, for a bounded time; other errors are not retried."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from shared.backoff import Backoff
from shared.bus import streams
from shared.config import ConfigError


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "BACKOFF", Backoff(base_s=0.001, max_s=0.01))
    monkeypatch.setattr(streams, "TRANSIENT_RETRY_S", 0.2)


async def test_a_call_that_times_out_during_an_election_is_asked_again() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.errors.TimeoutError
        return "ok"

    assert await streams.through_elections(call) == "ok" and calls == 3


async def test_it_gives_up_after_its_time() -> None:
    async def never() -> None:
        raise nats.errors.NoRespondersError

    with pytest.raises(nats.errors.NoRespondersError):
        await streams.through_elections(never)


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await streams.through_elections(broken)
    assert calls == 1


async def test_a_nats_url_where_no_server_answers_stops_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "CONNECT_WAIT_S", 1.0)
    url = "nats://127.0.0.1:1,nats://127.0.0.1:2"
    with pytest.raises(streams.NatsUnreachable, match="JETBATCH_NATS_URL=nats://127.0.0.1:1,"):
        await streams.connect(url, "test")
    assert issubclass(streams.NatsUnreachable, ConfigError)  # exit 2, as for any bad setting


async def test_a_publish_to_a_stream_without_a_leader_is_asked_again() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise nats.js.errors.NoStreamResponseError  # what js.publish raises mid-election
        return "ok"

    assert await streams.through_elections(call) == "ok"


async def test_the_last_wait_is_cut_to_the_deadline_and_waits_are_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "BACKOFF", Backoff(base_s=10, max_s=10))
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.errors.TimeoutError
        return "ok"

    # Waits of 10 s, capped at 0.05 s: the third try runs well within the 5 s window.
    assert await streams.through_elections(call, within_s=5, max_delay_s=0.05) == "ok"
    with pytest.raises(nats.errors.TimeoutError):
        await streams.through_elections(lambda: _timeout(), within_s=0.1)


async def _timeout() -> None:
    raise nats.errors.TimeoutError
