"""Settings Structs read from environment variables, each field's variable derived from its name.

A settings Struct declares `env_prefix: ClassVar[str]`; a field's variable is the prefixes of the
Structs that lead to it + its name upper-case (`JETBATCH_` + `WEBHOOK_` + `MAX_ATTEMPTS`), unless
its Meta names one (`Meta(extra={"env": "OTEL_SERVICE_NAME"})`). A field whose type is itself a
settings Struct is read from the same environment. The type says what a variable accepts
(`Annotated[int, Meta(ge=1, description=...)]`); a `Parse` beside the Meta reads a syntax msgspec
does not know, an `AtMost` compares the field with a sibling. The defaults are the Struct's own.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import Meta

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Parse:
    """Turns a variable's text into the field's value. `read(variable, text)` raises ConfigError
    with its own message, or ValueError for "expected <accepts>, got <text>"."""

    read: Callable[[str, str], Any]
    accepts: str
    show: Callable[[Any], str] | None = None  # the value as a variable's text, for the README


@dataclasses.dataclass(frozen=True)
class AtMost:
    """The field may not exceed its sibling field `other`."""

    other: str


def parse_bool(variable: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# What msgspec cannot convert from text, by type. A field's own Parse comes first.
BY_TYPE: dict[Any, Parse] = {
    bool: Parse(parse_bool, "true or false (also 1/0, yes/no, on/off)"),
    Path: Parse(lambda variable, text: Path(text), "a path"),
}


@dataclasses.dataclass(frozen=True)
class Var:
    """One field of a settings Struct and the variable it is read from."""

    name: str
    path: tuple[str, ...]  # attribute names from the root Struct, e.g. ("webhooks", "secret")
    field: msgspec.structs.FieldInfo
    type: Any  # the field's type without Annotated and None
    meta: Meta
    parse: Parse | None
    at_most: AtMost | None

    @property
    def default(self) -> Any:
        """The Struct's default, or msgspec.NODEFAULT for a required field."""
        factory = self.field.default_factory
        return self.field.default if factory is msgspec.NODEFAULT else factory()

    def accepts(self, siblings: dict[str, Var] | None = None) -> str:
        """What the variable accepts, e.g. "an integer >= 1"; `siblings` name an AtMost's other."""
        if self.parse is not None:
            return self.parse.accepts
        if typing.get_origin(self.type) is Literal:
            choices = [str(c) for c in typing.get_args(self.type)]
            return " or ".join(choices) if len(choices) <= 2 else "one of " + ", ".join(choices)
        noun = {int: "an integer", float: "a number"}.get(self.type, "text")
        m = self.meta
        bounds = [
            f"{op} {_text(bound)}"
            for op, bound in ((">=", m.ge), (">", m.gt), ("<=", m.le), ("<", m.lt))
            if bound is not None
        ]
        if self.at_most is not None and siblings:
            bounds.append(f"<= {siblings[self.at_most.other].name}")
        return " ".join([noun, " and ".join(bounds)]) if bounds else noun

    def read(self, text: str) -> Any:
        """The value of `text`; raises ConfigError naming the variable and what it accepts."""
        try:
            if self.parse is not None:
                return self.parse.read(self.name, text)
            if self.type is not str:
                text = text.strip()
            return msgspec.convert(text, self.field.type, strict=False)
        except (msgspec.ValidationError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{self.name}: expected {self.accepts()}, got {text!r}") from None


def is_settings(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct) and hasattr(tp, "env_prefix")


def _unwrap(tp: Any) -> tuple[Any, Meta, Parse | None, AtMost | None]:
    meta, parse, at_most = Meta(), None, None
    if typing.get_origin(tp) is typing.Annotated:
        tp, *extras = typing.get_args(tp)
        for extra in extras:
            if isinstance(extra, Meta):
                meta = extra
            elif isinstance(extra, Parse):
                parse = extra
            elif isinstance(extra, AtMost):
                at_most = extra
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # X | None
        tp = next(a for a in args if a is not type(None))
    return tp, meta, parse or BY_TYPE.get(tp), at_most


def variables(
    cls: type[msgspec.Struct], prefix: str = "", path: tuple[str, ...] = ()
) -> Iterator[Var]:
    """Every variable of `cls` and of the settings Structs in it, in field order."""
    prefix += getattr(cls, "env_prefix", "")
    for f in msgspec.structs.fields(cls):
        tp, meta, parse, at_most = _unwrap(f.type)
        if is_settings(tp):
            yield from variables(tp, prefix, (*path, f.name))
            continue
        name = (meta.extra or {}).get("env") or prefix + f.name.upper()
        yield Var(name, (*path, f.name), f, tp, meta, parse, at_most)


def _read(own: dict[str, Var], env: dict[str, str], errors: list[str]) -> dict[str, Any]:
    """The values of one Struct's own fields: from `env`, else their defaults."""
    values: dict[str, Any] = {}
    for name, var in own.items():
        text = env.get(var.name) or ""  # an empty variable is an unset one
        try:
            value = var.read(text) if text else var.default
        except ConfigError as e:
            errors.append(str(e))
            continue
        if value is msgspec.NODEFAULT:
            errors.append(f"{var.name} is required: {var.accepts()}")
            continue
        # Relative paths are taken from the working directory when the settings are loaded.
        values[name] = value.resolve() if isinstance(value, Path) else value
    for name, var in own.items():
        if var.at_most is None or name not in values or var.at_most.other not in values:
            continue  # a bad value was reported already
        limit = values[var.at_most.other]
        if values[name] > limit:
            other = own[var.at_most.other].name
            errors.append(f"{var.name}: expected at most {other} ({limit}), got {values[name]}")
    return values


def _build(cls: Any, path: tuple[str, ...], values: dict[tuple[str, ...], dict[str, Any]]) -> Any:
    fields = dict(values.get(path, {}))
    for f in msgspec.structs.fields(cls):
        if f.name not in fields:  # a settings Struct of its own
            fields[f.name] = _build(_unwrap(f.type)[0], (*path, f.name), values)
    return cls(**fields)


def load(cls: type[T], env: dict[str, str]) -> T:
    """`cls` from `env`, or one ConfigError listing every bad variable, one a line."""
    structs: dict[tuple[str, ...], dict[str, Var]] = {}
    for var in variables(cls):
        structs.setdefault(var.path[:-1], {})[var.path[-1]] = var
    errors: list[str] = []
    values = {path: _read(own, env, errors) for path, own in structs.items()}
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} bad settings:\n  " + "\n  ".join(errors))
    return typing.cast(T, _build(cls, (), values))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(map(_text, value))
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _shown_default(var: Var) -> str:
    """The default as the README shows it: the variable's text, or what leaving it unset means."""
    unset = (var.meta.extra or {}).get("unset")
    if unset:
        return f"({unset})"
    if var.default is msgspec.NODEFAULT:
        return "(required)"
    if var.default is None or var.default == ():
        return "(none)"
    show = var.parse.show if var.parse and var.parse.show else _text
    return f"`{show(var.default)}`"


def markdown_table(cls: type[msgspec.Struct]) -> str:
    """The README's table of `cls`'s variables: default, meaning and what each accepts."""
    all_vars = list(variables(cls))
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in all_vars:
        siblings = {v.path[-1]: v for v in all_vars if v.path[:-1] == var.path[:-1]}
        accepts = var.accepts(siblings)
        shown = f"*Accepts {accepts}.*" if accepts not in ("text", "a path") else ""
        meaning = ". ".join(filter(None, [var.meta.description, shown]))
        lines.append(f"| `{var.name}` | {_cell(_shown_default(var))} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def with_table(document: str, table: str) -> str:
    """`document` with the text between the START and END markers replaced by `table`."""
    head, start, rest = document.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"the document has no {START} ... {END} markers")
    return f"{head}{START}\n{table}{END}{tail}"
