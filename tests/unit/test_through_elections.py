"""Start-up calls to JetStream are asked again while a cluster elects a leader (timeouts, 503),
with the one backoff, for a bounded time; other errors are not retried."""

from __future__ import annotations

import nats.errors
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
