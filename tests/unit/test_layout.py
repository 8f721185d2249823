"""The layout keeps its promises (STYLE.md): small modules and functions, `shared/` below
`services/`, and the consumer plumbing (pulling, nak, signals) in `shared/` only."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE = ("services", "shared", "schemas")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Names an asyncpg connection, pool or cursor goes by here: their `fetch(...)` is a query, not a
# JetStream pull.
DB_HANDLES = {"conn", "connection", "pool", "cursor"}


def modules(*tops: str) -> Iterator[Path]:
    for top in tops:
        yield from sorted((REPO / top).rglob("*.py"))


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=name(path))


def test_no_module_is_over_500_lines() -> None:
    too_long = {
        name(p): n
        for p in modules(*CODE)
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_no_function_is_over_80_lines() -> None:
    too_long = {
        f"{name(p)}:{node.lineno} {node.name}": length
        for p in modules(*CODE, "bench")
        for node in ast.walk(parse(p))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES
    }
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def imported_modules(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module an import statement names, at any depth (a lazy import counts too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_nothing_in_shared_imports_from_services() -> None:
    upward = [
        f"{name(p)}:{line} imports {module}"
        for p in modules("shared")
        for line, module in sorted(imported_modules(parse(p)))
        if module == "services" or module.startswith("services.")
    ]
    assert not upward, "shared/ is below services/:\n" + "\n".join(upward)


def receiver(call: ast.Call) -> str | None:
    """`conn` for `conn.fetch(...)` and `deps.pool.fetch(...)` gives `pool`; None for `f(...)`."""
    if not isinstance(call.func, ast.Attribute):
        return None
    target = call.func.value
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def called(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return None


def is_query(call: ast.Call) -> bool:
    """asyncpg's fetch: on a database handle, or with SQL text as its first argument."""
    first = call.args[0] if call.args else None
    sql = isinstance(first, ast.JoinedStr) or (
        isinstance(first, ast.Constant) and isinstance(first.value, str)
    )
    return receiver(call) in DB_HANDLES or sql


def consumer_plumbing(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "MSG.NEXT" in node.value:
                yield node.lineno, "a raw MSG.NEXT pull"
        if not isinstance(node, ast.Call):
            continue
        what = called(node)
        if what == "fetch" and not is_query(node):
            yield node.lineno, "fetch("
        elif what == "nak":
            yield node.lineno, ".nak("
        elif what == "add_signal_handler":
            yield node.lineno, "add_signal_handler"
        elif what == "signal" and receiver(node) in ("signal", None):
            yield node.lineno, "signal.signal("


def test_no_service_pulls_naks_or_handles_signals_itself() -> None:
    """Pulling, acking policy and shutdown on a signal belong to the consumer runner in shared/;
    a service declares its consumer and handles one message."""
    found = [
        f"{name(p)}:{line} {what}"
        for p in modules("services")
        for line, what in sorted(consumer_plumbing(parse(p)))
    ]
    assert not found, "consumer plumbing outside shared/:\n" + "\n".join(found)


# nats-py internals jetbatch's fast paths read (shared/bus/nats_private.py wraps each).
NATS_PRIVATE = {"_pending_queue", "_pending_size", "_pending_msgs_limit"}
NATS_HANDLES = {"js", "nc", "sub", "msg", "client"}


def test_nats_pys_private_attributes_are_read_only_in_nats_private() -> None:
    wrapper = REPO / "shared" / "bus" / "nats_private.py"
    found = [
        f"{name(p)}:{node.lineno} .{node.attr}"
        for p in modules(*CODE, "bench", "tests")
        if p != wrapper
        for node in ast.walk(parse(p))
        if isinstance(node, ast.Attribute)
        and (
            node.attr in NATS_PRIVATE
            or (
                node.attr.startswith("_")
                and isinstance(node.value, ast.Name)
                and node.value.id in NATS_HANDLES
            )
        )
    ]
    assert not found, f"nats-py internals read outside shared/bus/nats_private.py: {found}"


def test_no_two_test_modules_share_a_name() -> None:
    """tests/ folders are not packages: pytest imports test modules by their base name, so two
    modules of one name in different folders fail the whole run at collection."""
    names = Counter(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert not [n for n, count in names.items() if count > 1]
