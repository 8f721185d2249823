"""The synchronous requests' concurrency caps (services/api/concurrency.py)."""

from __future__ import annotations

import pytest

from services.api.concurrency import SyncSlots
from shared.errors import RateLimited


def test_a_request_past_the_per_api_cap_is_refused_whoever_sends_it() -> None:
    slots = SyncSlots(per_api=2, per_caller=5)
    with slots.take("a"), slots.take("b"):
        with pytest.raises(RateLimited) as refused:
            with slots.take("c"):
                pass
    assert refused.value.headers == {"retry-after": "1"}
    assert refused.value.code == "too_many_concurrent_requests"
    with slots.take("c"):  # freed once the others ended
        assert slots.running == 1


def test_a_caller_past_its_own_cap_is_refused_while_others_go_on() -> None:
    slots = SyncSlots(per_api=10, per_caller=1)
    with slots.take("a"):
        with pytest.raises(RateLimited):
            with slots.take("a"):
                pass
        with slots.take("b"):
            assert slots.running == 2
    assert slots.running == 0


def test_a_slot_is_freed_when_its_request_fails() -> None:
    slots = SyncSlots(per_api=1, per_caller=1)
    with pytest.raises(ValueError), slots.take("a"):
        raise ValueError("the worker failed")
    with slots.take("a"):
        pass
