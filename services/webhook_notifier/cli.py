"""`jetbatch webhooks ...`: manage webhook endpoints and dead letters through the api (the same
routes and checks as any client: README "Webhooks"). Talks HTTP to JETBATCH_API_URL (default
http://<JETBATCH_API_HOST>:<JETBATCH_API_PORT>/v1) with JETBATCH_API_KEY, or the key `jetbatch up`
saved in <data dir>/api-key; `--url` / `--api-key` override both."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from schemas.webhooks import WEBHOOK_EVENT_TYPES
from shared import config

TIMEOUT_S = 30


class ApiError(Exception):
    pass


class Client:
    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise ApiError(f"HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise ApiError(f"cannot reach the api at {self.base_url}: {e.reason}") from None


def default_client(settings: config.Settings, url: str | None, key: str | None) -> Client:
    if url is None:
        url = os.environ.get("JETBATCH_API_URL")
    if url is None:
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        url = f"http://{host}:{settings.api_port}/v1"
    if key is None:
        key = settings.api_key
    if key is None:
        saved = settings.data_dir / "api-key"
        if saved.exists():
            key = saved.read_text().strip() or None
    return Client(url, key)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def _page(client: Client, path: str, query: dict[str, str | None]) -> list[dict[str, Any]]:
    """Every page of a list route."""
    items: list[dict[str, Any]] = []
    params = {k: v for k, v in query.items() if v is not None}
    while True:
        page = client.call("GET", f"{path}?{urllib.parse.urlencode({**params, 'limit': '100'})}")
        items.extend(page["data"])
        if not page["has_more"] or not page["data"]:
            return items
        params["after"] = page["last_id"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetbatch webhooks", description=__doc__)
    p.add_argument("--url", help="the api's base URL (…/v1)")
    p.add_argument("--api-key", help="the api key")
    p.add_argument("--json", action="store_true", help="print the api's JSON answers")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="register an endpoint; prints its signing secret once")
    add.add_argument("endpoint_url")
    add.add_argument(
        "--event",
        action="append",
        choices=WEBHOOK_EVENT_TYPES,
        dest="events",
        help="an event type to send (repeatable; default: all batch events)",
    )
    add.add_argument("--name", default="")
    add.add_argument("--secret", help="a whsec_... secret of your own (default: generated)")
    sub.add_parser("list", help="list the registered endpoints")
    remove = sub.add_parser("remove", help="remove an endpoint (its pending deliveries stop)")
    remove.add_argument("endpoint_id")
    deliveries = sub.add_parser("deliveries", help="list deliveries, newest first")
    deliveries.add_argument("--status", choices=["pending", "delivered", "dead", "cancelled"])
    deliveries.add_argument("--batch", help="only this batch's deliveries")
    sub.add_parser("dead", help="list the dead letters (deliveries that exhausted their retries)")
    show = sub.add_parser("show", help="a delivery and every attempt")
    show.add_argument("delivery_id")
    resend = sub.add_parser("resend", help="give dead letters a new round of attempts")
    resend.add_argument("delivery_ids", nargs="*", metavar="DELIVERY_ID")
    resend.add_argument("--all-dead", action="store_true", help="every dead letter")
    return p  # fmt: skip


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    settings = config.load()
    client = default_client(settings, args.url, args.api_key)
    try:
        return _run(client, args)
    except ApiError as e:
        print(f"jetbatch webhooks: {e}", file=sys.stderr)
        return 1


def _run(client: Client, args: argparse.Namespace) -> int:
    out: Any
    if args.command == "add":
        body: dict[str, Any] = {"url": args.endpoint_url, "name": args.name}
        if args.events:
            body["event_types"] = args.events
        if args.secret:
            body["secret"] = args.secret
        out = client.call("POST", "/webhook_endpoints", body)
        if not args.json:
            print(f"{out['id']}  {out['url']}  {','.join(out['event_types'])}")
            print(f"signing secret (shown once): {out['signing_secret']}")
            return 0
    elif args.command == "list":
        out = _page(client, "/webhook_endpoints", {})
        if not args.json:
            rows = [[e["id"], e["name"], ",".join(e["event_types"]), e["url"]] for e in out]
            print(_table(rows, ["ID", "NAME", "EVENTS", "URL"]))
            return 0
    elif args.command == "remove":
        out = client.call("DELETE", f"/webhook_endpoints/{urllib.parse.quote(args.endpoint_id)}")
        if not args.json:
            print(f"removed {out['id']}")
            return 0
    elif args.command in ("deliveries", "dead"):
        status = "dead" if args.command == "dead" else args.status
        batch = getattr(args, "batch", None)
        out = _page(client, "/webhook_deliveries", {"status": status, "batch_id": batch})
        if not args.json:
            rows = [
                [d["id"], d["status"], str(d["attempts"]), d["event_type"], d["batch_id"],
                 d["url"], (d["last_error"] or "")[:80]]
                for d in out
            ]  # fmt: skip
            header = ["ID", "STATUS", "ATTEMPTS", "EVENT", "BATCH", "URL", "LAST ERROR"]
            print(_table(rows, header))
            return 0
    elif args.command == "show":
        out = client.call("GET", f"/webhook_deliveries/{urllib.parse.quote(args.delivery_id)}")
        if not args.json:
            print(f"{out['id']}  {out['status']}  {out['event_type']}  {out['batch_id']}")
            print(f"url: {out['url']}")
            rows = [[str(a["attempt"]), f"{a['started_at']:.3f}", str(a["status_code"] or ""),
                     "" if a["latency_ms"] is None else str(a["latency_ms"]), a["error"] or ""]
                    for a in out["attempt_log"] or []]  # fmt: skip
            print(_table(rows, ["ATTEMPT", "STARTED", "STATUS", "MS", "ERROR"]))
            return 0
    elif args.command == "resend":
        ids = list(args.delivery_ids)
        if args.all_dead:
            ids += [d["id"] for d in _page(client, "/webhook_deliveries", {"status": "dead"})]
        if not ids:
            print("jetbatch webhooks resend: name deliveries or pass --all-dead", file=sys.stderr)
            return 2
        out = [
            client.call("POST", f"/webhook_deliveries/{urllib.parse.quote(i)}/resend") for i in ids
        ]
        if not args.json:
            for d in out:
                print(f"re-sending {d['id']} ({d['event_type']} to {d['url']})")
            return 0
    else:  # pragma: no cover - argparse refuses other commands
        return 2
    print(json.dumps(out, indent=2))
    return 0
