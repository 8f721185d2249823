"""README's "How the code is laid out", read straight from the code: each service's declared
consumers (shared.consumer.Consumer) and the messages it emits. `python -m services.layout
README.md` (`just docs`) rewrites the section; tests/unit/test_layout.py fails when it drifts."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

START, END = "<!-- layout:start -->", "<!-- layout:end -->"

# In data-flow order.
SERVICES = ("api", "inference", "results_writer", "webhook_notifier", "watchdog")


def markdown() -> str:
    rows = ["| service | what it does | consumes | emits |", "|---|---|---|---|"]
    for name in SERVICES:
        module = importlib.import_module(f"services.{name}.service")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        summary = summary.split(": ", 1)[-1] if summary.startswith(f"{name}:") else summary
        consumers = "<br>".join(c.describe() for c in module.CONSUMERS) or "HTTP only"
        emits = "<br>".join(
            t if isinstance(t, str) else f"{t.__name__} `{t.subject}`" for t in module.EMITS
        )
        rows.append(f"| `services/{name}` | {summary} | {consumers} | {emits or '-'} |")
    return "\n".join(rows) + "\n"


def with_layout(document: str) -> str:
    """`document` with the text between the START and END markers replaced by the layout."""
    head, start, rest = document.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"the document has no {START} ... {END} markers")
    return f"{head}{START}\n{markdown()}{END}{tail}"


def main(argv: list[str]) -> int:
    if not argv:
        print(markdown(), end="")
        return 0
    path = Path(argv[0])
    path.write_text(with_layout(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
