"""`jetbatch dlq list|show|replay` and `jetbatch workers`: the operator's side of the api's own
routes (services/api/admin.py, README "Dead letters" and "Operations"). Talks HTTP to
JETBATCH_API_URL (default http://<JETBATCH_API_HOST>:<JETBATCH_API_PORT>/v1) with
JETBATCH_API_KEY, or the key `jetbatch up` saved in <data dir>/api-key; `--url` / `--api-key`
override both."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from services.client import target

TIMEOUT_S = 30


class CliError(Exception):
    pass


def _base(url: str | None, key: str | None) -> tuple[str, str | None]:
    """The api and key the CLI talks to (services/client.py: flags, environment, data dir)."""
    where = target(url, key)
    return where.url, where.key


def _call(base: tuple[str, str | None], method: str, path: str) -> Any:
    url, key = base
    request = urllib.request.Request(
        f"{url}{path}", method=method, data=b"" if method == "POST" else None
    )
    request.add_header("Accept", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise CliError(f"HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach the api at {url}: {e.reason}") from None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)  # fmt: skip


def _ago(ts: int | None) -> str:
    return "-" if ts is None else f"{max(0, int(time.time()) - ts)}s ago"


def dlq_list(base: tuple[str, str | None], args: argparse.Namespace) -> str:
    rows: list[dict[str, Any]] = []
    after: int | None = None
    while len(rows) < args.limit:
        query = {"limit": str(min(100, args.limit - len(rows)))}
        if after is not None:
            query["after"] = str(after)
        if args.batch_id:
            query["batch_id"] = args.batch_id
        page = _call(base, "GET", f"/dead_letters?{urllib.parse.urlencode(query)}")
        rows += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    if args.json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no dead letters"
    table = [
        [r["id"], _ago(r["created_at"]), r["source"], r["batch_id"], r["custom_id"],
         r["deliveries"], r["replay_count"] or "", r["error"][:60]]
        for r in rows
    ]  # fmt: skip
    header = ["ID", "CREATED", "SOURCE", "BATCH", "CUSTOM_ID", "DELIVERIES", "REPLAYED", "ERROR"]
    return _table(table, header)


def dlq_show(base: tuple[str, str | None], args: argparse.Namespace) -> str:
    return json.dumps(_call(base, "GET", f"/dead_letters/{args.id}"), indent=2)


def dlq_replay(base: tuple[str, str | None], args: argparse.Namespace) -> str:
    out = []
    for dead_letter_id in args.ids:
        letter = _call(base, "POST", f"/dead_letters/{dead_letter_id}/replay")
        out.append(
            f"replayed {letter['id']} to {letter['subject']} "
            f"(batch {letter['batch_id'] or '-'}, custom_id {letter['custom_id'] or '-'}, "
            f"{letter['replay_count']} replay(s) so far)"
        )
    return "\n".join(out)


def workers(base: tuple[str, str | None], args: argparse.Namespace) -> str:
    data = _call(base, "GET", "/workers")["data"]
    if args.json:
        return json.dumps(data, indent=2)
    if not data:
        return "no workers have reported"
    table = [
        [w["worker_id"], w["model"], w["host"], f"{w['age_s']:.0f}s",
         "STALE" if w["stale"] else "ok", "yes" if w["healthy"] else "NO",
         f"{w['in_flight']}/{w['capacity']}", w["completed"], w["gpu_name"],
         w["gpu_temperature_c"]]
        for w in data
    ]  # fmt: skip
    header = ["WORKER", "MODEL", "HOST", "SEEN", "HEARTBEAT", "HEALTHY", "IN FLIGHT", "DONE",
              "GPU", "TEMP C"]  # fmt: skip
    return _table(table, header)


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"jetbatch {command}")
    parser.add_argument("--url", help="the api's base URL (default: JETBATCH_API_URL or local)")
    parser.add_argument("--api-key", help="default: JETBATCH_API_KEY or <data dir>/api-key")
    if command == "dlq":
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="dead letters, newest first")
        listing.add_argument("--batch-id", help="only this batch's")
        listing.add_argument("--limit", type=int, default=50)
        listing.add_argument("--json", action="store_true")
        listing.set_defaults(run=dlq_list)
        show = sub.add_parser("show", help="one dead letter, with its payload")
        show.add_argument("id", type=int)
        show.set_defaults(run=dlq_show)
        replay = sub.add_parser("replay", help="publish dead letters again to their subjects")
        replay.add_argument("ids", type=int, nargs="+")
        replay.set_defaults(run=dlq_replay)
    else:
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(run=workers)
    args = parser.parse_args(argv)
    base = _base(args.url, args.api_key)
    try:
        print(args.run(base, args))
    except CliError as e:
        print(f"jetbatch {command}: {e}", file=sys.stderr)
        return 1
    return 0
