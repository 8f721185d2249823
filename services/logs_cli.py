"""`jetbatch logs [SERVICE] [--follow] [--tail N] [--level LEVEL]`: the services' log files that
`jetbatch up` writes (`<data dir>/logs/<service>.log` and its rotated `.1`, `.2`...), merged in
time order, with counts of errors and warnings. Reads both formats (JETBATCH_LOG_FORMAT): JSON
lines and the readable text, whose tracebacks continue a record on the lines below it."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from shared import config
from shared.logs import JsonRecord

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_TEXT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (\S+): "
    r"(.*?)(?: \[((?:batch_id|custom_id)=\S+(?: custom_id=\S+)?)\])?$"
)
_json = msgspec.json.Decoder(JsonRecord)
FOLLOW_POLL_S = 0.5


def log_path(data_dir: Path, service: str) -> Path:
    """A service's log file: `inference[SmolLM2-135M-Instruct]` -> `inference-SmolLM2-...log`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", service).strip("-")
    return data_dir / "logs" / f"{name}.log"


@dataclass
class Record:
    when: float  # seconds since the epoch
    level: str
    service: str
    logger: str
    message: str
    batch_id: str | None = None
    custom_id: str | None = None
    more: list[str] = field(default_factory=list)  # a traceback's lines

    @property
    def severity(self) -> int:
        return LEVELS.get(self.level, 0)

    def render(self) -> str:
        stamp = datetime.datetime.fromtimestamp(self.when).isoformat(" ", "milliseconds")
        ids = " ".join(
            f"{k}={v}" for k, v in (("batch_id", self.batch_id), ("custom_id", self.custom_id)) if v
        )
        head = f"{stamp} {self.level} {self.service} {self.logger}: {self.message}"
        return "\n".join([f"{head} [{ids}]" if ids else head, *self.more])


def parse_line(line: str) -> Record | None:
    """One line as the start of a record, or None (a continuation, or not a log line)."""
    line = line.rstrip("\n")
    if line.startswith("{"):
        try:
            j = _json.decode(line)
        except msgspec.DecodeError:
            return None
        when = datetime.datetime.fromisoformat(j.time.replace("Z", "+00:00")).timestamp()
        more = j.exception.splitlines() if j.exception else []
        return Record(when, j.level, j.service, j.logger, j.message, j.batch_id, j.custom_id, more)
    m = _TEXT.match(line)
    if m is None:
        return None
    stamp, level, service, logger, message, ids = m.groups()
    when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    tags = dict(part.split("=", 1) for part in (ids or "").split())
    return Record(
        when, level, service, logger, message, tags.get("batch_id"), tags.get("custom_id")
    )


def parse(lines: Iterable[str]) -> Iterator[Record]:
    """Records; a line that starts none continues the one before (a traceback)."""
    current: Record | None = None
    for line in lines:
        record = parse_line(line)
        if record is not None:
            if current is not None:
                yield current
            current = record
        elif current is not None and line.strip():
            current.more.append(line.rstrip("\n"))
    if current is not None:
        yield current


def files_of(logs_dir: Path, service: str | None) -> list[Path]:
    """A service's current log files (all services' without one): `<stem>.log` names them;
    SERVICE matches a stem or its start (`inference` is every worker; `_` = `-`)."""
    stems = sorted(p.name.removesuffix(".log") for p in logs_dir.glob("*.log"))
    if service is not None:
        want = service.replace("_", "-")
        stems = [s for s in stems if s == want or s.startswith(want + "-")]
    return [logs_dir / f"{s}.log" for s in stems]


def with_backups(path: Path) -> list[Path]:
    """`x.log.5` ... `x.log.1`, `x.log`: oldest first."""
    backups = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            backups.append((int(suffix), p))
    return [p for _, p in sorted(backups, reverse=True)] + [path]


def read(paths: Iterable[Path]) -> list[Record]:
    """Every record of these files (and their backups), in time order."""
    records: list[Record] = []
    for path in paths:
        for part in with_backups(path):
            with open(part, encoding="utf-8", errors="replace") as f:
                records.extend(parse(f))
    records.sort(key=lambda r: r.when)  # stable: one file's order kept for equal times
    return records


def select(records: list[Record], level: str, tail: int | None) -> list[Record]:
    at_least = LEVELS[level.upper()]
    chosen = [r for r in records if r.severity >= at_least]
    return chosen[-tail:] if tail is not None and tail >= 0 else chosen


def counts(records: Iterable[Record]) -> tuple[int, int]:
    """(errors, warnings): ERROR and CRITICAL are errors."""
    errors = warnings = 0
    for r in records:
        errors += r.severity >= LEVELS["ERROR"]
        warnings += r.severity == LEVELS["WARNING"]
    return errors, warnings


class Follower:
    """What is appended to the log files after it started (new files and rotations included),
    as rendered lines at or above `level`: `poll()` once in a while."""

    def __init__(self, logs_dir: Path, service: str | None, level: str) -> None:
        self.logs_dir, self.service = logs_dir, service
        self.at_least = LEVELS[level.upper()]
        self._at: dict[Path, tuple[int, int]] = {}  # path -> (inode, offset)
        self._partial: dict[Path, str] = {}
        self._showing = False  # whether the last record started was shown (its tracebacks too)
        for path in files_of(logs_dir, service):
            st = path.stat()
            self._at[path] = (st.st_ino, st.st_size)

    def poll(self) -> list[str]:
        out: list[str] = []
        for path in files_of(self.logs_dir, self.service):
            for line in self._new_lines(path):
                record = parse_line(line)
                if record is not None:
                    self._showing = record.severity >= self.at_least
                    if self._showing:
                        out.append(record.render())
                elif self._showing and line.strip():
                    out.append(line)
        return out

    def _new_lines(self, path: Path) -> list[str]:
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        inode, offset = self._at.get(path, (st.st_ino, 0))
        if inode != st.st_ino or st.st_size < offset:  # rotated: the new file from its start
            inode, offset = st.st_ino, 0
            self._partial.pop(path, None)
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            f.seek(offset)
            data = f.read()
            self._at[path] = (inode, f.tell())
        data = self._partial.pop(path, "") + data
        lines = data.split("\n")
        if lines[-1]:
            self._partial[path] = lines[-1]
        return lines[:-1]


def follow(
    follower: Follower, write: Callable[[str], None], *, poll_s: float = FOLLOW_POLL_S
) -> None:
    """Print what comes until interrupted (Ctrl-C)."""
    try:
        while True:
            for line in follower.poll():
                write(line)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass


def main(argv: list[str], env: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jetbatch logs",
        description="the service logs `jetbatch up` writes in <data dir>/logs (JETBATCH_DATA_DIR)",
    )
    parser.add_argument("service", nargs="?", help="api, inference, results-writer, ... (all)")
    parser.add_argument(
        "-f", "--follow", action="store_true", help="print new records as they come"
    )
    parser.add_argument("-n", "--tail", type=int, default=None, help="the last N records only")
    parser.add_argument(
        "--level", default="debug", type=str.lower, choices=[k.lower() for k in LEVELS],
        help="records at this level or above",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object a record, then one with the counts (not with --follow)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logs_dir = config.load(dict(os.environ) if env is None else env).data_dir / "logs"
    paths = files_of(logs_dir, args.service) if logs_dir.is_dir() else []
    if not paths:
        print(f"jetbatch logs: no log files for {args.service or 'any service'} in {logs_dir}",
              file=sys.stderr)  # fmt: skip
        return 1
    follower = Follower(logs_dir, args.service, args.level) if args.follow else None
    records = read(paths)
    if args.json:
        for record in select(records, args.level, args.tail):
            print(msgspec.json.encode(record).decode())
        errors, warnings = counts(records)
        print(msgspec.json.encode({"errors": errors, "warnings": warnings}).decode())
        return 0
    for record in select(records, args.level, args.tail):
        print(record.render())
    errors, warnings = counts(records)
    names = ", ".join(p.name.removesuffix(".log") for p in paths)
    print(f"-- {errors} errors, {warnings} warnings in {names}", flush=True)
    if follower is not None:
        follow(follower, lambda line: print(line, flush=True))
    return 0
