"""Graceful stop on the real engine: SIGTERM a vLLM (CPU) inference worker while it holds
requests in vLLM. It stops pulling, drains for JETBATCH_DRAIN_TIMEOUT_S, aborts what is still
running in vLLM and hands it back; another worker finishes the batch. Every custom_id comes back
exactly once, and what the vLLM worker finished is kept (not run twice)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.crash.test_crash import FAST_RECOVERY, check_batch, client
from tests.harness import Harness
from tests.helpers import CHAT, chat_jsonl, wait_until_sync

pytestmark = [pytest.mark.slow, pytest.mark.crash, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_of_a_vllm_worker_hands_back_in_flight_requests(
    nats_server, database_url: str, tmp_path: Path
) -> None:
    env = dict(FAST_RECOVERY)
    env.pop("JETBATCH_INSTANT_DELAY_S")
    env.pop("JETBATCH_MAX_IN_FLIGHT")
    h = Harness(tmp_path / "harness", env, nats=nats_server, database_url=database_url)
    h.start_servers()
    try:
        for name in ("api", "results_writer", "watchdog"):
            h.start(name)
        h.wait_api()
        h.start(
            "worker-1",
            JETBATCH_ENGINE="vllm",
            JETBATCH_MODELS_DIR=str(REPO / ".jetbatch" / "models"),
            JETBATCH_DRAIN_TIMEOUT_S="1",
            HF_HUB_OFFLINE="1",
        )
        wait_until_sync(
            lambda: "ready" in h.log_tail("worker-1", 200),
            "vLLM worker ready",
            timeout_s=400,
            interval_s=1,
        )
        c = client(h)
        n = 24
        # 1,024 tokens each, however fast the CPU: on an AVX-512 machine 24 x 96 tokens were done
        # in under 4 s, before the SIGTERM, leaving nothing to hand back.
        data = chat_jsonl(n, "v", content="Tell me a long story.", max_tokens=1024, ignore_eos=True)
        f = c.files.create(file=("v.jsonl", data), purpose="batch")
        batch_id = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id
        # vLLM is now generating for all 24 at once (tens of seconds on 2 cores).
        time.sleep(4)
        h.kill("worker-1", signal.SIGTERM)
        # Its drain (1 s) and the abort are long over by 60 s: a worker still running then fails
        # the wait (TimeoutExpired).
        assert h.wait("worker-1", 60) == 0
        assert "handed back" in h.log_tail("worker-1", 200)
        h.start("worker-2")  # instant engine: finishes what was handed back
        batch = check_batch(h, c, batch_id, n, "v", {"completed"})
        assert batch.request_counts.failed == 0
    finally:
        h.stop_all()
