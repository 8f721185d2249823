"""compose.yaml and infra/ stay true to the code (issue 12): every container and systemd unit runs
a `jetbatch` command that exists, with variables the code reads and the settings its service
cannot start without; three NATS nodes route to each other and every service lists them all; no
volume is shared; the api replicas sit behind one port; each inference container owns its GPUs.
NATS is closed (issue 13): every node's config includes the generated authorization.conf and
authenticates its routes, nats-server accepts it with exactly the variables the node is given,
and every service and unit connects as the NATS user the code runs it as, with that user's
password and no other.

A "dry start" runs the real `jetbatch` command line (services/cli.py) in this process with a
container's environment only, up to where the service would connect: argument parsing, settings,
`requires` and the checks a service makes of them all run; serving, migrating and logging set-up
do not."""

from __future__ import annotations

import ast
import base64
import hashlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml

from services import cli, supervisor
from services.api import service as api_service
from shared import config, db, nats_auth, process, settings_env, telemetry
from shared.embedded import EmbeddedNats, nats_server_binary

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "Dockerfile"
SYSTEMD = REPO / "infra" / "systemd"
NATS_DIR = REPO / "infra" / "nats"
NATS_CONFS = sorted(NATS_DIR.glob("cluster-*.conf"))
SINGLE_CONF = NATS_DIR / "single.conf"
AUTHORIZATION = NATS_DIR / "authorization.conf"  # generated (tests/unit/test_nats_auth.py)
BINARY = "/opt/jetbatch/.venv/bin/jetbatch"  # where infra/install.sh puts it, under /opt/jetbatch

SETTINGS = {var.name for var in settings_env.variables(config.Settings)}
# Every NATS user the shipped authorization admits, and the routes' user.
NATS_USERS = (
    *re.findall(r'"user":\s*"(\w+)"', AUTHORIZATION.read_text()),
    nats_auth.ROUTE_USER,
)
NATS_PASSWORDS = {user: nats_auth.password_variable(user) for user in NATS_USERS}
# What an operator supplies through compose's ${...} or in place of an example file's <...>.
# Every NATS password differs from the others (so one given in place of another shows) and is
# letters and digits from a letter (nats-server reads it as a config value, URLs carry it).
OPERATOR_ENV = {
    config.variable("api_key"): "sk-jetbatch-test",
    config.variable("webhooks.secret"): "whsec_" + base64.b64encode(bytes(32)).decode(),
    "POSTGRES_PASSWORD": "pg-password",
    **{
        variable: "n" + hashlib.sha256(user.encode()).hexdigest()[:24]
        for user, variable in NATS_PASSWORDS.items()
    },
}
SECRETS = (config.variable("api_key"), config.variable("webhooks.secret"))
DATABASE_URL = config.variable("database_url")
NATS_URL = config.variable("nats_url")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


SERVICES: dict[str, dict[str, Any]] = load_compose()["services"]
# The containers built from the jetbatch image: their `command` is `jetbatch`'s arguments.
JETBATCH = sorted(
    name
    for name, spec in SERVICES.items()
    if (spec.get("build") or {}).get("dockerfile") == "infra/Dockerfile"
)
NODES = sorted(name for name, spec in SERVICES.items() if spec.get("image", "").startswith("nats:"))
UNITS = sorted(SYSTEMD.glob("*.service"))


# -- reading compose.yaml, the Dockerfile, NATS configs and systemd units ------------------------


def interpolate(text: str) -> str:
    """Compose's ${NAME}, ${NAME:?error}, ${NAME:-default} and $$, from OPERATOR_ENV."""

    def value(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in OPERATOR_ENV:
            return OPERATOR_ENV[name]
        if op.endswith("-"):
            return default
        pytest.fail(f"compose.yaml interpolates ${{{name}}}, which OPERATOR_ENV does not give")

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, text).replace("$$", "$")


def environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def replicas(spec: dict[str, Any]) -> int:
    return int((spec.get("deploy") or {}).get("replicas", 1))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def image_env(before: str | None = None) -> dict[str, str]:
    """The image's ENV (only those set before the first RUN that mentions `before`)."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if before and instruction == "RUN" and before in args:
            break
        if instruction == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
    return env


def container_env(name: str) -> dict[str, str]:
    return {**image_env(), **environment(SERVICES[name])}


def conf_text(path: Path) -> str:
    """A NATS config without its comments."""
    return re.sub(r"#.*", "", path.read_text())


def conf_block(text: str, name: str, where: str) -> str:
    """What is inside `name { ... }` in `text` (blocks nest)."""
    m = re.search(rf"^\s*{name}\s*[:=]?\s*\{{", text, re.MULTILINE)
    assert m, f"{where} has no `{name} {{ ... }}`"
    depth = 1
    for i in range(m.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[m.end() : i]
    pytest.fail(f"{where}: `{name} {{` is never closed")


def conf_includes(path: Path) -> list[Path]:
    """The files a config includes (nats-server resolves them beside it)."""
    names = re.findall(r'^\s*include\s+"?([^"\s;]+)"?', conf_text(path), re.MULTILINE)
    return [(path.parent / name).resolve() for name in names]


def conf_variables(path: Path) -> set[str]:
    """The variables a config and what it includes read (from the server's environment)."""
    unquoted = re.sub(r'"[^"]*"', '""', conf_text(path))  # "$JS.API.>" is a subject
    own = set(re.findall(r"\$(\w+)", unquoted))
    return own.union(*(conf_variables(included) for included in conf_includes(path)))


def nats_conf(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """What these tests check of a node's config. Routes given as `$VARIABLE` are read from `env`
    (the node's environment), as nats-server reads them: a config value."""
    text = conf_text(path)

    def one(pattern: str, where: str = text) -> str:
        m = re.search(pattern, where, re.MULTILINE)
        assert m, f"{path.name} has no {pattern!r}"
        return m.group(1)

    cluster = conf_block(text, "cluster", path.name)
    routes = one(r"routes\s*[:=]?\s*(\[[^\]]*\]|\$\w+)", cluster)
    if routes.startswith("$"):
        assert routes[1:] in env, f"{path.name} reads its routes from {routes}: not given"
        routes = env[routes[1:]]
    auth = conf_block(cluster, "authorization", f"{path.name}'s cluster block")
    return {
        "server_name": one(r"^server_name:\s*(\S+)"),
        "client_port": one(r"^listen:\s*\S*:(\d+)"),
        "http_port": one(r"^http_port:\s*(\d+)"),
        "store_dir": one(r"store_dir:\s*(\S+)"),
        "cluster_name": one(r"\bname:\s*(\S+)", cluster),
        "cluster_port": one(r"listen:\s*\S*:(\d+)", cluster),
        "route_user": one(r'\buser\s*[:=]\s*"?(\w+)', auth),
        "route_password": one(r'\bpassword\s*[:=]\s*("[^"]*"|[^\s,}]+)', auth),
        "routes": [urlsplit(url) for url in re.findall(r'[^\s,\[\]"]+', routes)],
    }


def conf_client_port(path: Path) -> str:
    m = re.search(r"^listen:\s*\S*:(\d+)", conf_text(path), re.MULTILINE)
    assert m, f"{path.name} has no client port"
    return m.group(1)


def nats_server_accepts(path: Path, env: dict[str, str]) -> str:
    """What `nats-server -t` says of a config given only `env` ("" if it accepts it)."""
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, env=env
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr


def nats_servers(url: str) -> list[Any]:
    return [urlsplit(server.strip()) for server in url.split(",") if server.strip()]


def nats_role(argv: list[str]) -> str:
    """The NATS user the code runs `jetbatch argv` as: `jetbatch up` gives each service its own
    (supervisor.service_children) and migrates with the embedded server's `url`."""
    if argv[0] == "migrate":
        server = EmbeddedNats(
            REPO / "unused", port=4222, auth=nats_auth.NatsAuth({u: "x" for u in nats_auth.ROLES})
        )
        user = nats_auth.url_user(server.url)
        assert user, "jetbatch up migrates without a NATS user"
        return user
    roles = {
        child.name.partition("[")[0]: child.role
        for child in supervisor.service_children(config.load({}))
    }
    assert argv[0] in roles, f"jetbatch up runs no {argv[0]}: which NATS user is it?"
    return roles[argv[0]]


def connects_as_its_own_user(where: str, argv: list[str], env: dict[str, str]) -> None:
    """`where` (a container or unit) connects to every server as the user the code runs
    `jetbatch argv` as, with that user's password, and is given no other NATS password."""
    role = nats_role(argv)
    assert role in NATS_USERS, f"{where}: the NATS servers admit no user {role!r}"
    assert NATS_URL in env, f"{where} is given no {NATS_URL}"
    for server in nats_servers(env[NATS_URL]):
        host = f"{server.hostname}:{server.port}"
        assert server.username == role, (
            f"{where} connects to {host} as {server.username}, not {role}"
        )
        assert server.password == OPERATOR_ENV[NATS_PASSWORDS[role]], (
            f"{where} connects to {host} as {role} without {NATS_PASSWORDS[role]}"
        )
    others = {
        variable
        for user, variable in NATS_PASSWORDS.items()
        if user != role and any(OPERATOR_ENV[variable] in value for value in env.values())
    }
    assert not others, f"{where} ({role}) is given other NATS users' passwords: {sorted(others)}"
    given = {key for key in env if key in NATS_PASSWORDS.values()}
    assert not given, f"{where} needs its URL only, not {sorted(given)}"


def mounts(spec: dict[str, Any], read_only: bool = False) -> Iterator[tuple[str, str]]:
    """(source, target) of every volume and bind mount (only those mounted read-only, with
    `read_only`); anonymous volumes have no source."""
    for item in spec.get("volumes") or []:
        if isinstance(item, dict):
            if item.get("read_only") or not read_only:
                yield item.get("source", ""), item["target"]
        elif ":" in item:
            source, target, *mode = item.split(":")
            if "ro" in ",".join(mode).split(",") or not read_only:
                yield source, target


def unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's keys, each with every value it is given."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def example_env(path: str, instance: str) -> dict[str, str]:
    """An EnvironmentFile as its example beside the unit gives it (`/etc/jetbatch/env` ->
    `infra/systemd/env.example`), every <...> value replaced with what an operator supplies."""
    example = SYSTEMD / (Path(path.replace("%i", instance)).name + ".example")
    assert example.exists(), f"{path} has no example ({example.relative_to(REPO)})"
    env = {}
    for line in example.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if value.startswith("<"):
                value = OPERATOR_ENV.get(key, value)
            # <VARIABLE> inside a value: what the operator gives that variable elsewhere.
            env[key] = re.sub(r"<(\w+)>", lambda m: OPERATOR_ENV.get(m.group(1), m.group(0)), value)
    return env


def unit_command(path: Path, instance: str = "0") -> tuple[list[str], dict[str, str]]:
    """A unit's `jetbatch` arguments and environment, as systemd would start instance `instance`."""
    keys = unit(path)
    env: dict[str, str] = {}
    for file in keys.get("EnvironmentFile", []):
        env.update(example_env(file.lstrip("-"), instance))
    argv = shlex.split(keys["ExecStart"][0].replace("%i", instance))
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in argv]
    assert argv[0] == BINARY, f"{path.name} runs {argv[0]}, not {BINARY}"
    return argv[1:], env


def cli_commands() -> set[str]:
    """The commands `jetbatch` has: its services and what its usage lists."""
    return set(cli.SERVICES) | set(re.findall(r"^  ([a-z][\w-]*)", cli.USAGE, re.MULTILINE))


def required_in_code(command: str) -> set[str]:
    """Fields a service passes to config.require anywhere in its package (its run-time checks)."""
    package = REPO / Path(*cli.SERVICES[command].split(".")[:-1])
    fields: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "require"
            ):
                fields |= {
                    a.value
                    for a in node.args[2:]
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                }
    return fields


# -- the dry start --------------------------------------------------------------------------------


class Connecting(Exception):
    """Raised where a dry start would open a connection: it got that far."""


@dataclass
class Started:
    code: int
    settings: config.Settings | None
    said: str  # stderr and log


DryStart = Callable[[list[str], dict[str, str]], Started]


@pytest.fixture
def dry_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> DryStart:
    loaded: list[config.Settings] = []
    real_load = config.load
    default_requires = inspect.signature(process.main).parameters["requires"].default

    def load(env: dict[str, str] | None = None) -> config.Settings:
        loaded.append(real_load(env))
        return loaded[-1]

    def main(
        service: str, serve: object, *, requires: tuple[str, ...] = default_requires, **_: object
    ) -> None:
        process.load_settings(service, requires)  # the real one: exits 2 naming what is missing

    async def connect(*args: object, **kwargs: object) -> None:
        raise Connecting

    class Server:  # uvicorn's, never run
        started = True

        def __init__(self, *args: object) -> None:
            pass

        def run(self) -> None:
            pass

    monkeypatch.setattr(config, "load", load)
    monkeypatch.setattr(process, "main", main)
    monkeypatch.setattr(telemetry, "setup", lambda *args: None)
    monkeypatch.setattr(asyncpg, "connect", connect)  # `jetbatch migrate` stops here
    monkeypatch.setattr(api_service, "Server", Server)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    # The worker claims its GPUs in the process environment, whatever os.environ is by then.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    def start(argv: list[str], env: dict[str, str]) -> Started:
        monkeypatch.setattr(os, "environ", dict(env))  # the inference worker writes to it
        loaded.clear()
        caplog.clear()
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Connecting:
            code = 0
        said = capsys.readouterr().err + caplog.text  # the api logs what stops it
        return Started(code, loaded[-1] if loaded else None, said)

    return start


def start_ok(dry_start: DryStart, argv: list[str], env: dict[str, str]) -> config.Settings:
    started = dry_start(argv, env)
    assert started.code == 0 and started.settings, f"jetbatch {shlex.join(argv)}: {started.said}"
    return started.settings


def needs(dry_start: DryStart, argv: list[str], env: dict[str, str], variable: str) -> bool:
    """Whether `jetbatch argv` refuses to start without `variable`."""
    return dry_start(argv, {k: v for k, v in env.items() if k != variable}).code != 0


def command(name: str) -> list[str]:
    return [str(word) for word in SERVICES[name]["command"]]


def by_command(*commands: str) -> list[str]:
    return [name for name in JETBATCH if command(name)[0] in commands]


# -- compose.yaml ---------------------------------------------------------------------------------


def test_the_image_runs_the_jetbatch_command() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["jetbatch"] == "services.cli:main"
    entrypoints = [args for instruction, args in dockerfile() if instruction == "ENTRYPOINT"]
    assert entrypoints == ['["jetbatch"]']


def test_every_container_runs_a_command_that_exists_and_every_service_runs() -> None:
    unknown = {
        name: command(name)[0] for name in JETBATCH if command(name)[0] not in cli_commands()
    }
    assert not unknown, f"commands jetbatch does not have: {unknown}"
    missing = set(cli.SERVICES) - {command(name)[0] for name in JETBATCH}
    assert not missing, f"services compose.yaml does not run: {missing}"
    assert by_command("migrate"), "no one-shot `jetbatch migrate`"


def test_every_jetbatch_variable_in_compose_and_infra_is_a_setting() -> None:
    install_sh = (REPO / "infra" / "install.sh").read_text()
    allowed = SETTINGS | set(re.findall(r"\$\{?(JETBATCH_\w+)", install_sh))
    allowed |= set(NATS_PASSWORDS.values())  # the NATS servers' (shared/nats_auth.py)
    files = [
        REPO / "compose.yaml",
        DOCKERFILE,
        *NATS_CONFS,
        SINGLE_CONF,
        *sorted(SYSTEMD.iterdir()),
    ]
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in files
        # (not a pattern such as JETBATCH_NATS_<USER>_PASSWORD)
        for name in re.findall(r"JETBATCH_[A-Z0-9_]+\b(?!<)", path.read_text())
        if name not in allowed
    }
    assert not unknown, f"not a setting in shared/config.py: {sorted(unknown)}"


@pytest.mark.parametrize("name", JETBATCH)
def test_every_container_starts_with_the_settings_its_service_needs(
    name: str, dry_start: DryStart
) -> None:
    settings = start_ok(dry_start, command(name), container_env(name))
    if command(name)[0] in cli.SERVICES:
        config.require(settings, name, *required_in_code(command(name)[0]))


@pytest.mark.parametrize(
    "name", [n for n in JETBATCH if command(n)[0] in cli.SERVICES or NATS_URL in container_env(n)]
)
def test_every_service_lists_the_three_nats_nodes_and_replicates_three_times(
    name: str, dry_start: DryStart
) -> None:
    settings = start_ok(dry_start, command(name), container_env(name))
    assert settings.nats_url
    servers = [f"{s.scheme}://{s.hostname}:{s.port}" for s in nats_servers(settings.nats_url)]
    ports = {conf_client_port(conf) for conf in NATS_CONFS}
    assert sorted(servers) == sorted(f"nats://{node}:{port}" for node in NODES for port in ports)
    assert settings.nats_replicas == len(NODES) == 3


@pytest.mark.parametrize(
    "name", [n for n in JETBATCH if command(n)[0] in cli.SERVICES or NATS_URL in container_env(n)]
)
def test_every_service_connects_as_its_own_nats_user_with_its_password(
    name: str, dry_start: DryStart
) -> None:
    env = container_env(name)
    settings = start_ok(dry_start, command(name), env)
    assert settings.nats_url == env.get(NATS_URL)
    connects_as_its_own_user(name, command(name), env)


@pytest.mark.parametrize("name", JETBATCH)
def test_containers_start_after_what_they_need_and_get_no_database_they_do_not_need(
    name: str, dry_start: DryStart
) -> None:
    argv, env = command(name), container_env(name)
    depends_on = SERVICES[name].get("depends_on") or {}
    conditions = {dep: (depends_on[dep] or {}).get("condition") for dep in depends_on}
    if argv[0] == "migrate":
        host = urlsplit(env[DATABASE_URL]).hostname
        assert conditions.get(host) == "service_healthy", f"migrate must wait for {host}"
    elif needs(dry_start, argv, env, DATABASE_URL):
        assert {conditions.get(m) for m in by_command("migrate")} == {
            "service_completed_successfully"
        }, f"{name} uses the database: it must start after the migrations"
    else:
        assert DATABASE_URL not in env, f"{name} does not use the database: no password for it"
    if NATS_URL in env or needs(dry_start, argv, env, NATS_URL):
        assert {conditions.get(node) for node in NODES} == {"service_healthy"}, name


def test_no_volume_is_mounted_by_two_containers() -> None:
    # A file of this repository mounted read-only (a NATS config) is not state: nodes share it.
    def shared_config(spec: dict[str, Any], source: str) -> bool:
        read_only = {s for s, _ in mounts(spec, read_only=True)}
        return source in read_only and source.startswith("./") and (REPO / source).is_file()

    containers = Counter(
        source
        for spec in SERVICES.values()
        for source, _ in mounts(spec)
        if source and not shared_config(spec, source)
        for _ in range(replicas(spec))
    )
    shared = {source: n for source, n in containers.items() if n > 1}
    assert not shared, f"mounted by several containers: {shared}"
    named = {s for spec in SERVICES.values() for s, _ in mounts(spec) if s and s[0] not in "./~"}
    assert named == set(load_compose().get("volumes") or {})


def node_config(node: str) -> tuple[str, Path]:
    """Where a node's container reads its config, and the file of this repository mounted there."""
    words = [str(word) for word in SERVICES[node]["command"]]
    target = words[words.index("--config") + 1]
    sources = {target: source for source, target in mounts(SERVICES[node])}
    return target, (REPO / sources[target]).resolve()


def test_three_nats_nodes_each_run_a_cluster_config_whose_routes_name_the_others() -> None:
    assert len(NODES) == 3 and len(NATS_CONFS) == 3
    mounted = {}
    for node in NODES:
        spec = SERVICES[node]
        sources = {target: source for source, target in mounts(spec)}
        _, conf = node_config(node)
        mounted[node] = conf
        parsed = nats_conf(conf, environment(spec))
        assert parsed["server_name"] == node
        assert {r.hostname for r in parsed["routes"]} == set(NODES)
        assert {str(r.port) for r in parsed["routes"]} == {parsed["cluster_port"]}
        store = sources.get(parsed["store_dir"], "")
        assert store and store[0] not in "./~", f"{node}: its JetStream store is not a volume"
        assert f":{parsed['http_port']}/healthz" in " ".join(spec["healthcheck"]["test"])
    assert sorted(mounted.values()) == NATS_CONFS
    names = {
        nats_conf(mounted[node], environment(SERVICES[node]))["cluster_name"] for node in NODES
    }
    assert len(names) == 1


@pytest.mark.parametrize("node", NODES)
def test_every_nats_node_admits_only_jetbatchs_users_and_authenticated_routes(node: str) -> None:
    spec, env = SERVICES[node], environment(SERVICES[node])
    target, conf = node_config(node)
    # The generated users (each role's permissions), mounted read-only where the include looks.
    assert AUTHORIZATION in conf_includes(conf), f"{conf.name} does not include authorization.conf"
    read_only = {target: source for source, target in mounts(spec, read_only=True)}
    for included in conf_includes(conf):
        at = str(PurePosixPath(target).parent / included.relative_to(conf.parent).as_posix())
        assert at in read_only, f"{node}: {included.name} is not mounted read-only at {at}"
        assert (REPO / read_only[at]).resolve() == included, f"{node}: {at} is not {included.name}"
    texts = [conf_text(conf), *(conf_text(included) for included in conf_includes(conf))]
    assert not [t for t in texts if "no_auth_user" in t], "a user for connections without one"
    # Routes: this node asks `route`'s password of any node connecting, and gives it to each.
    parsed = nats_conf(conf, env)
    route_password = NATS_PASSWORDS[nats_auth.ROUTE_USER]
    assert parsed["route_user"] == nats_auth.ROUTE_USER
    assert parsed["route_password"] == f"${route_password}", "the route password is written down"
    for route in parsed["routes"]:
        assert (route.username, route.password) == (nats_auth.ROUTE_USER, env[route_password]), (
            f"{conf.name}: the route to {route.hostname} does not authenticate as the route user"
        )
    # The node is given every variable its config reads, each password from the operator.
    needs = conf_variables(conf)
    assert set(NATS_PASSWORDS.values()) <= needs, "a user or the routes without their password"
    missing = needs - set(env)
    assert not missing, f"{node} is not given {sorted(missing)}"
    raw = spec.get("environment") or {}
    written = [key for key in needs & set(NATS_PASSWORDS.values()) if "${" not in str(raw[key])]
    assert not written, f"{node}: passwords written down in compose.yaml: {written}"
    # The real nats-server takes the config with exactly the node's environment.
    refused = nats_server_accepts(conf, env)
    assert not refused, f"nats-server refuses {conf.name} with {node}'s environment: {refused}"


def test_the_single_node_config_admits_only_jetbatchs_users() -> None:
    assert AUTHORIZATION in conf_includes(SINGLE_CONF)
    needs = conf_variables(SINGLE_CONF)
    users = {NATS_PASSWORDS[user] for user in NATS_USERS if user != nats_auth.ROUTE_USER}
    assert needs == users
    refused = nats_server_accepts(SINGLE_CONF, {v: OPERATOR_ENV[v] for v in needs})
    assert not refused, refused


def test_api_replicas_sit_behind_one_published_port(dry_start: DryStart) -> None:
    apis = by_command("api")
    assert sum(replicas(SERVICES[name]) for name in apis) >= 2
    port = None
    for name in apis:
        settings = start_ok(dry_start, command(name), container_env(name))
        assert settings.api_host in ("0.0.0.0", "::"), f"{name} must listen beyond its container"
        assert f":{settings.api_port}/healthz" in " ".join(SERVICES[name]["healthcheck"]["test"])
        port = settings.api_port
    published = [name for name, spec in SERVICES.items() if spec.get("ports")]
    assert len(published) == 1 and published[0] not in apis, "one front, not an api, publishes"
    front = [str(word) for word in SERVICES[published[0]]["command"]]
    upstreams = {front[i + 1] for i, word in enumerate(front) if word == "--to"}
    assert upstreams == {f"{name}:{port}" for name in apis}


def test_each_inference_container_owns_its_gpus_and_every_model_has_one(
    dry_start: DryStart,
) -> None:
    owned: list[str] = []
    served = set()
    for name in by_command("inference"):
        spec, argv = SERVICES[name], command(name)
        settings = start_ok(dry_start, argv, container_env(name))
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        ids = [str(i) for device in devices for i in device["device_ids"]]
        owned += ids
        assert replicas(spec) == 1, f"{name}: replicas would share its GPUs"
        # The container sees only its own GPUs, numbered from 0.
        gpus = argv[argv.index("--gpu") + 1].split(",")
        assert [int(g) for g in gpus] == list(range(len(ids))), f"{name}: --gpu {gpus}, {ids}"
        model = argv[argv.index("--model") + 1]
        assert settings.model(model), f"{name} serves {model}, not one of JETBATCH_MODELS"
        served.add(model)
    assert owned and len(owned) == len(set(owned)), f"GPUs reserved twice: {owned}"
    models = {
        tuple(start_ok(dry_start, command(name), container_env(name)).models) for name in JETBATCH
    }
    assert len(models) == 1, "every container must be given the same JETBATCH_MODELS"
    assert served == {m.name for m in next(iter(models))}, "a model without a worker"


def test_secrets_come_from_the_operators_environment() -> None:
    given = [
        (f"{name}: {key}", str(value))
        for name, spec in SERVICES.items()
        for key, value in (spec.get("environment") or {}).items()
        if key in (*SECRETS, DATABASE_URL)
    ]
    assert {where.split(": ")[1] for where, _ in given} == {*SECRETS, DATABASE_URL}
    given += [
        (f"{name}: {key}", str(value))
        for name, spec in SERVICES.items()
        for key, value in (spec.get("environment") or {}).items()
        if key in (NATS_URL, *NATS_PASSWORDS.values())
    ]
    written = [where for where, value in given if "${" not in value]
    assert not written, f"secrets written down in compose.yaml: {written}"
    assert not {*SECRETS, *NATS_PASSWORDS.values()} & set(image_env()), "secrets in the image"


def test_the_image_holds_the_project_and_finds_the_models_it_prepared(
    dry_start: DryStart,
) -> None:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted = {p.rstrip("*") for p in include["packages"]["find"]["include"]}
    wanted.add(db.MIGRATIONS_DIR.relative_to(REPO).parts[0])
    copied = {shlex.split(args)[0] for instruction, args in dockerfile() if instruction == "COPY"}
    assert wanted <= copied, f"not copied into the image: {wanted - copied}"
    built = config.load(image_env(before="install.sh")).models_dir
    for name in by_command("inference"):
        settings = start_ok(dry_start, command(name), container_env(name))
        assert settings.models_dir == built, f"{name} looks for models where the build put none"


# -- infra/systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_every_unit_runs_a_command_that_starts_with_the_example_settings(
    path: Path, dry_start: DryStart
) -> None:
    argv, env = unit_command(path)
    assert argv[0] in cli_commands()
    start_ok(dry_start, argv, env)


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_every_unit_connects_as_its_own_nats_user_with_its_password(path: Path) -> None:
    argv, env = unit_command(path)
    connects_as_its_own_user(path.name, argv, env)
    servers = {(s.hostname, s.port) for s in nats_servers(env[NATS_URL])}
    everyone = {(s.hostname, s.port) for s in nats_servers(unit_command(UNITS[0])[1][NATS_URL])}
    assert servers == everyone, f"{path.name} lists other NATS servers than {UNITS[0].name}"


def test_every_service_has_a_unit_and_those_that_use_the_database_require_migrate(
    dry_start: DryStart,
) -> None:
    commands = {path.name: unit_command(path) for path in UNITS}
    missing = set(cli.SERVICES) - {argv[0] for argv, _ in commands.values()}
    assert not missing, f"services without a systemd unit: {missing}"
    migrate = next(name for name, (argv, _) in commands.items() if argv[0] == "migrate")
    assert unit(SYSTEMD / migrate)["Type"] == ["oneshot"]
    for name, (argv, env) in commands.items():
        if argv[0] == "migrate":
            continue
        keys = unit(SYSTEMD / name)
        uses_db = needs(dry_start, argv, env, DATABASE_URL)
        after = " ".join(keys.get("After", [])).split()
        requires = " ".join(keys.get("Requires", [])).split()
        assert (migrate in after and migrate in requires) == uses_db, name
