"""Soak: keep batches flowing through jetbatch for a set time while random processes are
SIGKILLed and restarted (the api, the results writer, the watchdog, an inference worker, or the
nats-server on its store), then wait for every batch to finish and count what came back.

    .venv/bin/python -m bench.soak --duration 120 --batches 4 --lines 500
    .venv/bin/python -m bench.soak --cluster --duration 120

Prints lines submitted, lines returned, duplicates and lost (both must be 0), and exits non-zero
otherwise. Every service runs as its own process (tests/harness.py) on an embedded nats-server
and PostgreSQL with the instant engine (a small per-request delay keeps requests in flight), and
timings shortened so recovery takes seconds: a killed worker's requests come back after
JETBATCH_REQUEST_ACK_WAIT_S=5, a killed results writer's after its fixed 60 s ack wait.

With --cluster the services run on a 3-node NATS cluster on loopback with
JETBATCH_NATS_REPLICAS=3, and its nodes are among the victims: one node down at a time, restarted
on its store after a pause of 1-5 s, and a node is only killed once every replica of every stream
and consumer is current again (the node killed before has rejoined and caught up), so two of the
three always hold a quorum. It also prints the node kills, the stream leaders among them, and
fails if the cluster has not caught up again at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import openai

from schemas.openai import OutputLine
from shared import bus, process
from shared.embedded import EmbeddedNatsCluster
from tests.harness import API_KEY, CHAT_MODEL, Harness

log = logging.getLogger("bench.soak")

CHAT: Final = "/v1/chat/completions"
FINAL = {"completed", "failed", "cancelled", "expired"}
ENV = {
    "JETBATCH_REQUEST_ACK_WAIT_S": "5",
    "JETBATCH_REDRIVE_AFTER_S": "3",
    "JETBATCH_WATCHDOG_INTERVAL_S": "1",
    "JETBATCH_CLOSE_GRACE_S": "2",
    "JETBATCH_HEARTBEAT_INTERVAL_S": "1",
    "JETBATCH_MAX_IN_FLIGHT": "32",
    "JETBATCH_LOG_LEVEL": "WARNING",
}


@dataclass
class Submitted:
    batch_id: str
    prefix: str
    lines: int


@dataclass
class Tally:
    submitted_lines: int = 0
    returned_lines: int = 0
    duplicates: int = 0
    lost: int = 0
    unfinished_batches: list[str] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    count_mismatches: list[str] = field(default_factory=list)


def jsonl(n: int, prefix: str) -> bytes:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "soak test line"}]}
    lines = (
        json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT, "body": body})
        for i in range(n)
    )
    return ("\n".join(lines) + "\n").encode()


def retrying(what: str, call: Any, deadline_s: float = 120) -> Any:
    """Call until it works: the api may be down (killed) for a moment."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except (openai.APIConnectionError, openai.InternalServerError, openai.APITimeoutError):
            if time.monotonic() > deadline:
                raise
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


async def _cluster_state(url: str) -> dict[str, str] | None:
    """Each stream's leader if every replica of every stream and consumer is current (none
    offline, none behind), else None."""

    async def quiet(e: Exception) -> None:  # a killed node refusing connections is expected
        pass

    nc = await nats.connect(
        servers=bus.streams.server_list(url), name="soak-chaos", connect_timeout=2,
        allow_reconnect=False, error_cb=quiet,
    )  # fmt: skip
    try:
        js = nc.jetstream(timeout=2)
        leaders: dict[str, str] = {}
        for info in await js.streams_info():
            assert info.config.name is not None
            c = info.cluster
            peers = (c.replicas or []) if c is not None else []
            if c is None or c.leader is None or len(peers) < (info.config.num_replicas or 1) - 1:
                return None
            groups = [peers] + [
                (ci.cluster.replicas or []) if ci.cluster is not None else []
                for ci in await js.consumers_info(info.config.name)
            ]
            if not all(p.current and not p.offline for g in groups for p in g):
                return None
            leaders[info.config.name] = c.leader
        return leaders
    finally:
        await nc.close()


def cluster_state(url: str) -> dict[str, str] | None:
    try:
        return asyncio.run(_cluster_state(url))
    except Exception:  # between leaders, or the node we asked was just killed: not yet
        return None


def wait_caught_up(url: str, timeout_s: float) -> dict[str, str] | None:
    deadline = time.monotonic() + timeout_s
    while (state := cluster_state(url)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


class Nodes:
    """The cluster's nodes as victims, one down at a time: a node is killed only once every
    replica is current again, so the one killed before has rejoined and caught up and the
    other two always hold a quorum of every stream and consumer."""

    def __init__(self, cluster: EmbeddedNatsCluster) -> None:
        self.cluster = cluster
        self.leaders_killed: collections.Counter[str] = collections.Counter()
        self.skipped = 0  # kills not made: the cluster had not caught up in time
        self.caught_up_at_end: bool | None = None

    @property
    def names(self) -> list[str]:
        return [f"nats-{n.cluster.name}" for n in self.cluster.nodes if n.cluster is not None]

    def kill_and_restart(self, victim: str, pause_s: float) -> str | None:
        """What was killed, or None when the cluster did not catch up in time."""
        leaders = wait_caught_up(self.cluster.url, timeout_s=120)
        if leaders is None:
            self.skipped += 1
            return None
        name = victim.removeprefix("nats-")
        led = sorted(stream for stream, leader in leaders.items() if leader == name)
        self.cluster.node(name).kill()
        time.sleep(pause_s)
        self.cluster.node(name).start()  # the same store and ports, as after a crash
        self.leaders_killed.update(led)
        return f"{victim} (leading {', '.join(led) or 'no stream'})"


class Chaos(threading.Thread):
    """SIGKILLs a random process every `min_s`..`max_s` seconds, restarts it after a moment."""

    def __init__(
        self, h: Harness, victims: list[str], min_s: float, max_s: float, seed: int,
        nodes: Nodes | None = None,
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.h, self.nodes = h, nodes
        self.victims = victims + (nodes.names if nodes is not None else ["nats"])
        self.min_s, self.max_s = min_s, max_s
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(self.min_s, self.max_s)):
            victim = self.rng.choice(self.victims)
            try:
                what = self.kill_and_restart(victim)
                if what is None:
                    print(f"  not killing {victim}: the cluster has not caught up", flush=True)
                    continue
                self.kills[victim] += 1
                print(f"  killed and restarted {what}", flush=True)
            except Exception:
                log.exception("chaos: %s", victim)

    def kill_and_restart(self, victim: str) -> str | None:
        if victim.startswith("nats-") and self.nodes is not None:
            return self.nodes.kill_and_restart(victim, self.rng.uniform(1.0, 5.0))
        if victim == "nats":
            self.h.kill_nats()
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.h.restart_nats()
        else:
            self.h.kill(victim)
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.h.restart(victim)
        return victim


def tally(client: openai.OpenAI, batches: list[Submitted], finish_timeout_s: float) -> Tally:
    t = Tally(submitted_lines=sum(b.lines for b in batches))
    deadline = time.monotonic() + finish_timeout_s
    for b in batches:
        while True:
            batch = retrying("retrieve", lambda b=b: client.batches.retrieve(b.batch_id))
            if batch.status in FINAL or time.monotonic() > deadline:
                break
            time.sleep(1)
        t.statuses[batch.status] += 1
        if batch.status not in FINAL:
            t.unfinished_batches.append(b.batch_id)
            t.lost += b.lines
            continue
        ids: list[str] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            data = retrying("content", lambda f=file_id: client.files.content(f).read())
            for raw in data.splitlines():
                line = msgspec.json.decode(raw, type=OutputLine)
                ids.append(line.custom_id)
                if line.error is not None:
                    t.error_codes[line.error.code or "?"] += 1
        t.returned_lines += len(ids)
        t.duplicates += len(ids) - len(set(ids))
        t.lost += len({f"{b.prefix}-{i}" for i in range(b.lines)} - set(ids))
        counts = batch.request_counts
        if counts is None or (counts.total, counts.completed + counts.failed) != (
            b.lines,
            len(ids),
        ):
            t.count_mismatches.append(b.batch_id)
    return t


def start_servers(root: Path, env: dict[str, str], cluster: bool) -> tuple[Harness, Nodes | None]:
    """One nats-server started by the harness, or a 3-node cluster (replicas 3) started here."""
    if not cluster:
        h = Harness(root, env)
        h.start_servers()
        return h, None
    nodes = Nodes(EmbeddedNatsCluster(root / "nats-cluster").start())
    try:
        asyncio.run(bus.wait_for_jetstream(nodes.cluster.url))
        h = Harness(root, {**env, "JETBATCH_NATS_REPLICAS": "3"}, nats=nodes.cluster)
        h.start_servers()
    except BaseException:
        nodes.cluster.stop()
        raise
    return h, nodes


def soak(
    *,
    duration_s: float,
    open_batches: int,
    lines: int,
    workers: int,
    delay_s: float,
    kill_min_s: float,
    kill_max_s: float,
    seed: int,
    root: Path,
    cluster: bool = False,
) -> tuple[Tally, Chaos, float]:
    env = {**ENV, "JETBATCH_INSTANT_DELAY_S": str(delay_s)}
    h, nodes = start_servers(root, env, cluster)
    services = ["api", "results_writer", "watchdog", *(f"worker-{i + 1}" for i in range(workers))]
    chaos = Chaos(h, services, kill_min_s, kill_max_s, seed, nodes)
    try:
        for name in services:
            h.start(name)
        h.wait_api()
        client = openai.OpenAI(base_url=h.base_url, api_key=API_KEY, max_retries=2, timeout=30)
        submitted: list[Submitted] = []
        open_ids: set[str] = set()
        started = time.monotonic()
        chaos.start()
        n = 0
        while time.monotonic() - started < duration_s:
            for batch_id in list(open_ids):
                try:
                    if client.batches.retrieve(batch_id).status in FINAL:
                        open_ids.discard(batch_id)
                except openai.APIError:
                    pass
            while len(open_ids) < open_batches and time.monotonic() - started < duration_s:
                prefix = f"s{seed}-{n}"
                n += 1
                content = jsonl(lines, prefix)
                file_id = retrying(
                    "upload",
                    lambda c=content, p=prefix: (
                        client.files.create(file=(f"{p}.jsonl", c), purpose="batch").id
                    ),
                )
                batch_id = retrying(
                    "create",
                    lambda f=file_id: (
                        client.batches.create(
                            input_file_id=f, endpoint=CHAT, completion_window="24h"
                        ).id
                    ),
                )
                submitted.append(Submitted(batch_id, prefix, lines))
                open_ids.add(batch_id)
            time.sleep(1)
        chaos.stop.set()
        chaos.join()
        print(f"  chaos over after {time.monotonic() - started:.0f} s; waiting for batches")
        # The last kill may be a results writer: its fetch comes back after 60 s.
        result = tally(client, submitted, finish_timeout_s=240)
        if nodes is not None:  # every killed node back in the cluster and caught up
            nodes.caught_up_at_end = wait_caught_up(nodes.cluster.url, 60) is not None
        return result, chaos, time.monotonic() - started
    finally:
        chaos.stop.set()
        h.stop_all()
        if nodes is not None:
            nodes.cluster.stop()


def report(t: Tally, chaos: Chaos, elapsed_s: float) -> dict[str, Any]:
    figures = {
        "lines_submitted": t.submitted_lines,
        "lines_returned": t.returned_lines,
        "duplicates": t.duplicates,
        "lost": t.lost,
        "batches": dict(t.statuses),
        "unfinished_batches": t.unfinished_batches,
        "request_counts_mismatches": t.count_mismatches,
        "error_lines": dict(t.error_codes),
        "kills": dict(chaos.kills),
        "elapsed_s": round(elapsed_s, 1),
    }
    if chaos.nodes is not None:
        figures["nats_node_kills"] = sum(n for v, n in chaos.kills.items() if v.startswith("nats-"))
        figures["nats_stream_leaders_killed"] = dict(chaos.nodes.leaders_killed)
        figures["nats_kills_skipped"] = chaos.nodes.skipped
        figures["nats_caught_up_at_end"] = chaos.nodes.caught_up_at_end
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=120, help="seconds of chaos")
    parser.add_argument("--batches", type=int, default=4, help="batches kept open at once")
    parser.add_argument("--lines", type=int, default=500, help="lines per batch")
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--delay", type=float, default=0.005, help="seconds per request")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(4.0, 10.0),
                        metavar=("MIN_S", "MAX_S"), help="seconds between kills")  # fmt: skip
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--cluster", action="store_true",
                        help="a 3-node NATS cluster (replicas 3) whose nodes are killed too")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    process.sigterm_as_interrupt()  # unwind: stop what we started
    print(
        f"soak: {'3-node NATS cluster, ' if args.cluster else ''}"
        f"{args.duration:.0f} s, {args.batches} open batches of {args.lines} lines, "
        f"{args.workers} workers, a kill every {args.kill_every[0]:g}-{args.kill_every[1]:g} s, "
        f"seed {args.seed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="jetbatch-soak-", dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
        t, chaos, elapsed = soak(
            duration_s=args.duration,
            open_batches=args.batches,
            lines=args.lines,
            workers=args.workers,
            delay_s=args.delay,
            kill_min_s=args.kill_every[0],
            kill_max_s=args.kill_every[1],
            seed=args.seed,
            root=root,
            cluster=args.cluster,
        )
    figures = report(t, chaos, elapsed)
    for key, value in figures.items():
        print(f"  {key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = t.duplicates == 0 and t.lost == 0 and not t.unfinished_batches
    if chaos.nodes is not None:  # and every killed node rejoined and caught up
        ok = ok and chaos.nodes.caught_up_at_end is True
    print("OK: nothing lost, nothing duplicated" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def run(args: argparse.Namespace) -> None:
    """For `python -m bench soak`, should bench/__main__.py list it: a short soak."""
    lines = getattr(args, "lines", 0) or 500
    if main(["--duration", "60", "--lines", str(lines)]) != 0:
        raise RuntimeError("soak: lines were lost or duplicated")


if __name__ == "__main__":
    sys.exit(main())
