"""Every role connects with its own credentials and may do only what shared.nats_auth declares:
each publish and subscribe outside it is refused by the server (a probe of every subject family,
stream, bucket and inbox), and what the issue names in particular is checked on its own."""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig

from schemas.messages import (
    BatchEvent,
    InteractiveAbort,
    InteractiveRequest,
    RequestMessage,
    ResultMessage,
    subject_matches,
)
from shared import bus
from shared.embedded import EmbeddedNats
from shared.nats_auth import (
    ALL,
    SERVICE_ROLES,
    WATCHDOG_REPLAY,
    NatsAuth,
    inbox_prefix,
    publisher_user,
    role_for,
)

PROJECT = "proj_a"
OTHER = "proj_b"
PUBLISHER = publisher_user(PROJECT)
USERS = (*SERVICE_ROLES, "admin")

PUBLISH_PROBES = [
    RequestMessage.subject_for("m", project=PROJECT),
    RequestMessage.subject_for("m", project=OTHER),
    "jetbatch.requests.m.batch",
    ResultMessage.subject_for("b", PROJECT),
    ResultMessage.subject_for("b", OTHER),
    "jetbatch.results.b",
    "jetbatch.events.batch.completed",
    BatchEvent.subject_for("batch.completed", PROJECT),
    "jetbatch.control.batch.redrive",
    "jetbatch.deadletters.REQUESTS",
    "jetbatch.interactive.m",
    InteractiveRequest.subject_for("m", PROJECT),
    InteractiveAbort.subject_for("m", PROJECT),
    "jetbatch.interactive.m.x.y",
    "$KV.jetbatch_cancelled.b",
    WATCHDOG_REPLAY,
    "$KV.jetbatch_workers.w",
    "$KV.jetbatch_worker_control.w",
    *(f"jetbatch.logs.{u}" for u in SERVICE_ROLES),
    *(
        f"$JS.API.{op}.{s}"
        for s in ("LOGS", "KV_jetbatch_worker_control")
        for op in ("STREAM.INFO", "STREAM.DELETE", "STREAM.PURGE", "DIRECT.GET", "CONSUMER.CREATE")
    ),
    "$O.jetbatch_files.C.x",
    "$O.jetbatch_files.M.x",
    "$JS.API.INFO",
    *(f"{inbox_prefix(u)}.x" for u in (*USERS, PUBLISHER)),
    *(
        subject
        for s in ALL
        for subject in (
            f"$JS.API.STREAM.{op}.{s}" for op in ("INFO", "DELETE", "PURGE", "MSG.DELETE")
        )
    ),
    *(f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.probe" for s in ALL),
    *(f"$JS.API.CONSUMER.MSG.NEXT.{s}.probe" for s in ALL),
    *(f"$JS.ACK.{s}.probe.1.1.1.1.0" for s in ALL),
    f"$JS.API.CONSUMER.CREATE.RESULTS.mine.{ResultMessage.subject_for('b', PROJECT)}",
    f"$JS.API.CONSUMER.CREATE.RESULTS.theirs.{ResultMessage.subject_for('b', OTHER)}",
    "$JS.API.CONSUMER.CREATE.RESULTS.results_writer.jetbatch.results.proj_a.b",
    "$JS.API.CONSUMER.CREATE.RESULTS",
]
SUBSCRIBE_PROBES = [
    "jetbatch.requests.>",
    "jetbatch.results.>",
    f"jetbatch.results.{PROJECT}.>",
    f"jetbatch.results.{OTHER}.>",
    "jetbatch.events.>",
    "jetbatch.interactive.m",
    "jetbatch.interactive.m.*",
    InteractiveAbort.subject_for("m", PROJECT),
    "$KV.jetbatch_cancelled.>",
    WATCHDOG_REPLAY,
    "$KV.jetbatch_workers.>",
    "$KV.jetbatch_worker_control.>",
    "$JS.API.>",
    "_INBOX.x",
    *(f"{inbox_prefix(u)}.x" for u in (*USERS, PUBLISHER)),
]
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.I)


def allowed(allow: list[str], deny: list[str], subject: str) -> bool:
    return any(subject_matches(a, subject) for a in allow) and not any(
        subject_matches(d, subject) for d in deny
    )


class Probe:
    """A connection as one user that records what the server refused it."""

    def __init__(self, server: EmbeddedNats, user: str) -> None:
        self.server, self.user = server, user
        self.refused: set[tuple[str, str]] = set()

    async def __aenter__(self) -> nats.NATS:
        async def on_error(e: Exception) -> None:
            # nats-py reports the server's -ERR in lower case.
            if m := _VIOLATION.search(str(e)):
                self.refused.add((m[1], m[2]))

        self.nc = await nats.connect(
            self.server.url_for(self.user), error_cb=on_error, inbox_prefix=inbox_prefix(self.user)
        )
        return self.nc

    async def __aexit__(self, *_: object) -> None:
        await self.nc.close()

    async def settle(self) -> None:
        """Until the server's answers to everything sent are in (a violation comes first)."""
        await self.nc.flush()
        await asyncio.sleep(0.3)


@pytest.fixture
async def server(scratch_dir: Path) -> AsyncIterator[EmbeddedNats]:
    """A server that also admits an external publisher of PROJECT, with jetbatch's streams."""
    store = Path(tempfile.mkdtemp(prefix="nats-", dir=scratch_dir))
    server = EmbeddedNats(store, auth=NatsAuth.generate((PROJECT,))).start()
    try:
        nc = await bus.connect(server.url, "setup")
        await bus.ensure_streams(nc.jetstream())
        await nc.close()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("user", [*SERVICE_ROLES, PUBLISHER])
async def test_every_publish_and_subscribe_outside_a_role_is_refused(
    server: EmbeddedNats, user: str
) -> None:
    role = role_for(user)
    perms = role.permissions()
    pub, sub = perms["publish"], perms["subscribe"]
    assert isinstance(pub, dict) and isinstance(sub, dict)
    probe = Probe(server, user)
    async with probe as nc:
        for subject in PUBLISH_PROBES:
            await nc.publish(subject, b"")
        for subject in SUBSCRIBE_PROBES:
            await nc.subscribe(subject)
        await probe.settle()
    want = {
        ("publish", s) for s in PUBLISH_PROBES if not allowed(pub["allow"], pub.get("deny", []), s)
    } | {("subscription", s) for s in SUBSCRIBE_PROBES if not allowed(sub["allow"], [], s)}
    assert probe.refused == {(kind, s.lower()) for kind, s in want}
    # What the design names, whatever the declaration says:
    refused_pub = {s for kind, s in want if kind == "publish"}
    refused_sub = {s for kind, s in want if kind == "subscription"}
    other_inboxes = {f"{inbox_prefix(u)}.x" for u in (*USERS, PUBLISHER) if u != user}
    assert other_inboxes <= refused_sub and "_INBOX.x" in refused_sub
    assert f"{inbox_prefix(user)}.x" not in refused_sub
    abort = InteractiveAbort.subject_for("m", PROJECT)
    event = BatchEvent.subject_for("batch.completed", PROJECT)
    if user == "inference":
        assert {event, "$KV.jetbatch_cancelled.b"} <= refused_pub
        assert {"jetbatch.interactive.m", "jetbatch.interactive.m.*"}.isdisjoint(refused_sub)
        # It hears the api's aborts of synchronous requests but cannot abort anyone's.
        assert abort in refused_pub and abort not in refused_sub
    else:
        assert abort in refused_sub
    # Each service ships its own log records only; only the api commands workers.
    for other in SERVICE_ROLES:
        assert (f"jetbatch.logs.{other}" in refused_pub) == (other != user)
    assert ("$KV.jetbatch_worker_control.w" in refused_pub) == (user != "api")
    if user == "inference":
        assert "$KV.jetbatch_worker_control.>" not in refused_sub
    if user == "api":
        assert "$JS.API.DIRECT.GET.LOGS" not in refused_pub
        assert ResultMessage.subject_for("b", PROJECT) in refused_pub
        assert abort not in refused_pub
        assert InteractiveRequest.subject_for("m", PROJECT) not in refused_pub
    else:
        assert abort in refused_pub
    # Only the api asks for replays of results and control messages, only the watchdog hears it.
    assert (WATCHDOG_REPLAY in refused_pub) == (user not in ("api", "admin"))
    assert (WATCHDOG_REPLAY in refused_sub) == (user not in ("watchdog", "admin"))
    if user == PUBLISHER:
        assert RequestMessage.subject_for("m", project=PROJECT) not in refused_pub
        assert RequestMessage.subject_for("m", project=OTHER) in refused_pub
        assert f"jetbatch.results.{OTHER}.>" in refused_sub
        assert "$JS.API.CONSUMER.CREATE.RESULTS" in refused_pub  # an unfiltered consumer


async def test_a_connection_without_credentials_is_refused(nats_server: EmbeddedNats) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.anonymous_url, allow_reconnect=False)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        wrong = nats_server.url.replace(nats_server.auth.passwords["admin"], "wrong")
        await nats.connect(wrong, allow_reconnect=False)


async def test_a_publisher_reads_its_own_results_and_no_one_elses(server: EmbeddedNats) -> None:
    admin = await bus.connect(server.url, "admin")
    publisher = await bus.connect(server.url_for(PUBLISHER), "publisher")
    try:
        for project in (PROJECT, OTHER):
            result = ResultMessage(
                batch_id="b", line=0, custom_id="c", request_id="r", status_code=200,
                project=project,
            )  # fmt: skip
            await admin.jetstream().publish(result.published_on, msgspec.json.encode(result))
        js = publisher.jetstream()
        mine = ResultMessage.subject_for("b", PROJECT)
        sub = await js.subscribe(
            mine, ordered_consumer=True, config=ConsumerConfig(name="orders-b")
        )
        got = msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=ResultMessage)
        assert got.project == PROJECT
        with pytest.raises(nats.errors.TimeoutError):
            await js.subscribe(
                ResultMessage.subject_for("b", OTHER),
                ordered_consumer=True,
                config=ConsumerConfig(name="theirs-b"),
            )
    finally:
        await publisher.close()
        await admin.close()
