"""Who may do what on the bus: one NATS user per role, with only the subjects, streams, KV buckets
and object buckets that role needs, and an inbox prefix of its own (`_INBOX_<user>`), so no role
reads another's replies. The server's `authorization` block is generated here from ROLES, for the
embedded servers (shared.embedded) and for operators' own clusters (`example_config()`, kept as
infra/nats/authorization.conf, passwords from the environment).

A worker cannot publish batch events or write the cancel bucket; the api cannot publish results;
an external publisher may publish requests under its own project token and read only its
results. `admin` may do everything (migrations, `jetbatch up` itself, operators' tools)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from schemas.messages import DIRECT, InteractiveAbort, InteractiveRequest, subject_token
from schemas.projects import DEFAULT_PROJECT_ID

# Streams and buckets (mirrors shared.bus.streams; a test checks they agree).
REQUESTS, RESULTS, EVENTS, CONTROL, DEADLETTERS = (
    "REQUESTS", "RESULTS", "EVENTS", "CONTROL", "DEADLETTERS",
)  # fmt: skip
WORKERS_KV, CANCELLED_KV, FILES = "jetbatch_workers", "jetbatch_cancelled", "jetbatch_files"
STREAMS = (REQUESTS, RESULTS, EVENTS, CONTROL, DEADLETTERS)
BUCKET_STREAMS = (f"KV_{WORKERS_KV}", f"KV_{CANCELLED_KV}", f"OBJ_{FILES}")
# Created by whoever needs them first, outside STREAMS: the log records every service ships
# (each role publishes only its own `jetbatch.logs.<service>`) and operators' worker commands.
LOGS, CONTROL_KV = "LOGS", "jetbatch_worker_control"
_KV_CONTROL = f"KV_{CONTROL_KV}"


def logs_subject(service: str) -> str:
    return f"jetbatch.logs.{service}"


API, INFERENCE, RESULTS_WRITER, WEBHOOK_NOTIFIER, WATCHDOG, ADMIN = (
    "api", "inference", "results_writer", "webhook_notifier", "watchdog", "admin",
)  # fmt: skip
PUBLISHER_PREFIX = "publisher_"
ROUTE_USER = "route"


@dataclass(frozen=True)
class Role:
    """A NATS user's permissions, declared by what it does with each stream."""

    name: str
    publish: tuple[str, ...] = ()  # core subjects (JetStream publishes included)
    subscribe: tuple[str, ...] = ()  # core subscriptions besides its inbox
    manage: tuple[str, ...] = ()  # streams it looks up, creates and raises (start-up)
    consume: tuple[str, ...] = ()  # streams it reads with consumers (and acks)
    read: tuple[str, ...] = ()  # streams it reads single messages of (KV get, direct get)
    purge: tuple[str, ...] = ()  # streams it purges subjects of
    delete: tuple[str, ...] = ()  # streams it deletes single messages of
    deny: tuple[str, ...] = ()  # never, whatever else allows it
    extra_api: tuple[str, ...] = ()  # JetStream API subjects beyond the above
    responses: bool = False  # may answer requests sent to it (reply subjects of other roles)

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)

    def publish_allow(self) -> list[str]:
        if self.name == ADMIN:
            return [">"]
        api = ["$JS.API.INFO"] if self.manage else []
        for s in self.manage:
            api += [f"$JS.API.STREAM.{op}.{s}" for op in ("INFO", "CREATE", "UPDATE")]
        for s in self.consume:
            api += [
                f"$JS.API.CONSUMER.{op}.{s}.>"
                for op in ("CREATE", "DURABLE.CREATE", "INFO", "DELETE", "MSG.NEXT")
            ]
            api += [f"$JS.API.CONSUMER.CREATE.{s}", f"$JS.ACK.{s}.>", f"$JS.FC.{s}.>"]
        for s in self.read:
            api += [f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>"]
            api += [f"$JS.API.DIRECT.GET.{s}", f"$JS.API.STREAM.INFO.{s}"]
        api += [f"$JS.API.STREAM.PURGE.{s}" for s in self.purge]
        api += [f"$JS.API.STREAM.MSG.DELETE.{s}" for s in self.delete]
        if self.consume or self.manage:
            api.append("$JS.API.STREAM.NAMES")
        return [*self.publish, *dict.fromkeys(api), *self.extra_api]

    def subscribe_allow(self) -> list[str]:
        if self.name == ADMIN:
            return [">"]
        return [f"{self.inbox_prefix}.>", *self.subscribe]

    def permissions(self) -> dict[str, object]:
        publish: dict[str, list[str]] = {"allow": self.publish_allow()}
        if self.deny:
            publish["deny"] = list(self.deny)
        perms: dict[str, object] = {
            "publish": publish,
            "subscribe": {"allow": self.subscribe_allow()},
        }
        if self.responses:
            perms["allow_responses"] = True
        return perms


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


ALL = (*STREAMS, *BUCKET_STREAMS)
# The api asks the watchdog to replay a dead letter it may not publish (shared/domain/replay.py).
WATCHDOG_REPLAY = "jetbatch.watchdog.replay"
# Synchronous requests (`jetbatch.interactive.<model>.<project>`, and an older api's
# `jetbatch.interactive.<model>`) and their aborts (`jetbatch.interactive.abort.<model>.<project>`):
# the api sends both; workers only receive them (and answer requests on the api's reply
# subjects), so no worker can abort another's requests.
INTERACTIVE = (
    InteractiveRequest.subject.format(model="*", project="*"),
    InteractiveRequest.legacy_subject.format(model="*"),
    InteractiveAbort.subject.format(model="*", project="*"),
)
_KV_WORKERS, _KV_CANCELLED, _OBJ_FILES = BUCKET_STREAMS
# Subject families under `jetbatch.` besides `logs` (a role denied all of them).
_FAMILIES = ("requests", "results", "events", "control", "deadletters", "interactive")

ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        Role(ADMIN),
        # Validates and publishes batches (its child processes share its user), answers
        # synchronous requests through the workers, stores uploads, puts cancellations, runs
        # the watchdog's orders, deletes files with every copy of their content.
        Role(
            API,
            publish=(
                "jetbatch.requests.>",
                "jetbatch.events.>",
                *INTERACTIVE,
                f"$KV.{CANCELLED_KV}.>",
                f"$O.{FILES}.>",
                f"$KV.{CONTROL_KV}.>",
                logs_subject(API),
                WATCHDOG_REPLAY,
            ),  # fmt: skip
            manage=(*ALL, LOGS, _KV_CONTROL),
            consume=(CONTROL, _KV_WORKERS, _KV_CANCELLED, _OBJ_FILES, _KV_CONTROL, LOGS),
            read=(REQUESTS, _KV_WORKERS, _KV_CANCELLED, _OBJ_FILES, _KV_CONTROL, LOGS),
            purge=(RESULTS, _OBJ_FILES),
            delete=(REQUESTS,),
            deny=("jetbatch.results.>", f"$KV.{WORKERS_KV}.>"),
            # The workers' consumers' state for /metrics (queue depth: services/api/metrics.py).
            extra_api=(f"$JS.API.CONSUMER.INFO.{REQUESTS}.*",),
        ),
        # Runs requests; answers synchronous ones on the api's reply subjects (responses only)
        # and hears their aborts.
        Role(
            INFERENCE,
            publish=(
                "jetbatch.results.>",
                "jetbatch.deadletters.>",
                f"$KV.{WORKERS_KV}.>",
                logs_subject(INFERENCE),
            ),  # fmt: skip
            subscribe=(*INTERACTIVE, f"$KV.{CANCELLED_KV}.>", f"$KV.{CONTROL_KV}.>"),
            manage=(*STREAMS, _KV_WORKERS, _KV_CANCELLED, _KV_CONTROL, LOGS),
            consume=(REQUESTS, _KV_CANCELLED),
            read=(_KV_WORKERS, _KV_CANCELLED, _KV_CONTROL),
            deny=(
                "jetbatch.events.>",
                f"$KV.{CANCELLED_KV}.>",
                "jetbatch.requests.>",
                f"$KV.{CONTROL_KV}.>",
            ),  # fmt: skip
            responses=True,
        ),
        Role(
            RESULTS_WRITER,
            publish=("jetbatch.events.>", f"$O.{FILES}.>", logs_subject(RESULTS_WRITER)),
            manage=(RESULTS, EVENTS, _OBJ_FILES, LOGS),
            consume=(RESULTS, _OBJ_FILES),
            read=(RESULTS, _OBJ_FILES),
            purge=(_OBJ_FILES,),
            deny=("jetbatch.results.>", "jetbatch.requests.>", f"$KV.{CANCELLED_KV}.>"),
        ),
        Role(
            WEBHOOK_NOTIFIER,
            publish=(logs_subject(WEBHOOK_NOTIFIER),),
            manage=(EVENTS, LOGS),
            consume=(EVENTS,),
            # Everything of jetbatch's but its own log records.
            deny=(
                *(f"jetbatch.{family}.>" for family in _FAMILIES),
                "$KV.>",
                "$O.>",
            ),  # fmt: skip
        ),
        # Dead letters become error lines (results), orders go to the api, stops into the cancel
        # bucket, expired files out of the files bucket.
        Role(
            WATCHDOG,
            publish=(
                "jetbatch.results.>",
                "jetbatch.control.>",
                f"$KV.{CANCELLED_KV}.>",
                f"$O.{FILES}.>",
                logs_subject(WATCHDOG),
            ),  # fmt: skip
            manage=(*ALL, LOGS),
            consume=(DEADLETTERS, _KV_WORKERS, _KV_CANCELLED, _OBJ_FILES),
            read=(REQUESTS, _KV_WORKERS, _KV_CANCELLED, _OBJ_FILES),
            purge=(RESULTS, _OBJ_FILES),
            delete=(REQUESTS, _OBJ_FILES),
            deny=("jetbatch.requests.>", "jetbatch.events.>"),
            # The api's replays of results and control messages (shared/domain/replay.py).
            subscribe=(WATCHDOG_REPLAY,),
            responses=True,
        ),
    )
}
SERVICE_ROLES = (API, INFERENCE, RESULTS_WRITER, WEBHOOK_NOTIFIER, WATCHDOG)


def publisher_role(project: str) -> Role:
    """An external publisher of one project (README "Publishing to JetStream directly"):
    requests under its project token, its results read with an ordered consumer it names
    (the filter travels in the create subject, so the server holds it to its project) or a
    plain subscription."""
    token = subject_token(project)
    results = f"jetbatch.results.{token}.>"
    return Role(
        publisher_user(project),
        # Its lines are the direct class (schemas.messages.Priority): never the dispatched one.
        publish=(f"jetbatch.requests.*.{token}.{DIRECT}",),
        subscribe=(results,),
        extra_api=(
            "$JS.API.STREAM.NAMES",
            f"$JS.API.CONSUMER.CREATE.{RESULTS}.*.{results}",
            f"$JS.API.CONSUMER.INFO.{RESULTS}.*",
            f"$JS.API.CONSUMER.DELETE.{RESULTS}.*",
            f"$JS.FC.{RESULTS}.>",
        ),
        # jetbatch's own consumers cannot be updated to another filter under their name.
        deny=(f"$JS.API.CONSUMER.CREATE.{RESULTS}.results_writer.>",),
    )


def publisher_user(project: str) -> str:
    return PUBLISHER_PREFIX + subject_token(project)


def role_for(user: str) -> Role:
    if user.startswith(PUBLISHER_PREFIX):
        return publisher_role(user.removeprefix(PUBLISHER_PREFIX))
    return ROLES[user]


@dataclass(frozen=True)
class NatsAuth:
    """The users (role name -> password) a server admits, and the routes' password."""

    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def generate(cls, projects: tuple[str, ...] = (DEFAULT_PROJECT_ID,)) -> NatsAuth:
        users = [*ROLES, ROUTE_USER, *(publisher_user(p) for p in projects)]
        return cls({u: secrets.token_urlsafe(24) for u in users})

    @classmethod
    def load_or_create(
        cls, path: Path, projects: tuple[str, ...] = (DEFAULT_PROJECT_ID,)
    ) -> NatsAuth:
        """The credentials kept at `path`, or new ones written there, 0600 from the start; a
        role a newer version added gets its password (the file is replaced, 0600 again)."""
        wanted = cls.generate(projects)
        if not path.exists():
            write_private(path, json.dumps(wanted.passwords, indent=1) + "\n")
            return wanted
        kept = dict(json.loads(path.read_text()))
        if set(wanted.passwords) <= set(kept):
            return cls(kept)
        merged = cls({**wanted.passwords, **kept})
        write_private(path, json.dumps(merged.passwords, indent=1) + "\n")
        return merged

    @classmethod
    def load(cls, path: Path) -> NatsAuth:
        return cls(dict(json.loads(path.read_text())))

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(self.passwords, indent=1) + "\n")

    def with_publisher(self, project: str, rotate: bool = False) -> NatsAuth:
        """These users and `project`'s publisher (a new password if it had none, or `rotate`)."""
        user = publisher_user(project)
        if user in self.passwords and not rotate:
            return self
        return NatsAuth({**self.passwords, user: secrets.token_urlsafe(24)})

    def without_publisher(self, project: str) -> NatsAuth:
        user = publisher_user(project)
        return NatsAuth({u: p for u, p in self.passwords.items() if u != user})

    def url(self, server_url: str, user: str) -> str:
        """Each server of `server_url` (comma-separated) with `user`'s credentials in it."""
        return ",".join(
            with_user(part.strip(), user, self.passwords[user])
            for part in server_url.split(",")
            if part.strip()
        )

    def authorization(self) -> str:
        """The server's `authorization` block: one user per role."""
        users = [
            {"user": user, "password": password, "permissions": role_for(user).permissions()}
            for user, password in self.passwords.items()
            if user != ROUTE_USER
        ]
        return f"authorization {{\n  users: {json.dumps(users, indent=1)}\n}}\n"

    def route_authorization(self) -> str:
        return json.dumps({"user": ROUTE_USER, "password": self.passwords[ROUTE_USER]})

    def route_url(self, host_port: str) -> str:
        return f"nats-route://{ROUTE_USER}:{self.passwords[ROUTE_USER]}@{host_port}"


def password_variable(user: str) -> str:
    return f"JETBATCH_NATS_{user.upper()}_PASSWORD"


def example_config(projects: tuple[str, ...] = ("proj_default",)) -> str:
    """infra/nats/authorization.conf: every role, each password read from the server's
    environment (`password_variable`), for operators who run their own NATS."""
    users = [*ROLES, ROUTE_USER, *(publisher_user(p) for p in projects)]
    auth = NatsAuth({u: f"@{password_variable(u)}@" for u in users})
    text = auth.authorization().replace('"@', "$").replace('@"', "")
    route = auth.route_authorization().replace('"@', "$").replace('@"', "")
    return (
        "# Generated from shared/nats_auth.py (tests/unit/test_nats_auth.py keeps it current).\n"
        "# `include` it in every node's config; set each password variable in the server's\n"
        "# environment and give each service its own\n"
        "# JETBATCH_NATS_URL=nats://<user>:<password>@host:4222.\n"
        f"{text}"
        f"# In a cluster, inside `cluster {{ ... }}`: authorization: {route}\n"
        f"# and `routes: $NATS_CLUSTER_ROUTES`, a variable holding the whole list\n"
        f"# (nats-route://{ROUTE_USER}:<password>@node:6222, ...): nats-server does not expand a\n"
        f"# variable inside a string (infra/nats/cluster-*.conf, compose.yaml)\n"
    )


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}"


def url_user(url: str) -> str | None:
    """The user named in the first server of a JETBATCH_NATS_URL, if any."""
    first = url.split(",")[0].strip()
    return urlsplit(first if "://" in first else f"nats://{first}").username


def redacted(url: str) -> str:
    """A server URL fit for a log: its password replaced."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.password is None:
        return url
    return f"{parts.scheme}://{parts.username}:***@{parts.netloc.rpartition('@')[2]}"


def write_private(path: Path, text: str) -> None:
    """A secret, written with its final permissions (0600), never tightened afterwards: a new
    file created 0600 takes the place of whatever was there."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """No arguments: regenerate infra/nats/authorization.conf (`just docs`). `--project ID ...`:
    print the block with a publisher for each of those projects, for an operator's own NATS
    (which then reloads it: `nats-server --signal reload`)."""
    if not argv:
        repo = Path(__file__).resolve().parents[1]
        repo.joinpath("infra", "nats", "authorization.conf").write_text(example_config())
        return 0
    if argv[0] in ("-h", "--help") or argv[0] != "--project" or len(argv) < 2:
        print(main.__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    projects = tuple(argv[1:])
    bad = [p for p in projects if subject_token(p) != p]
    if bad:
        print(f"not project ids: {', '.join(bad)}")
        return 2
    print(example_config(projects), end="")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
