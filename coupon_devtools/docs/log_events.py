"""The log events' reference page, read from the worker's source: each stable event name, its
levels and the fields it carries (the keys of ``extra=``, literal or built beforehand), so an
on-call engineer knows what to grep for (docs/reference/log-events.md).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error", "critical", "exception")
#: Loggers are named ``log`` (or ``logger``) in every module of the worker.
LOGGER_NAMES = frozenset({"log", "logger", "_log"})


@dataclass
class LogEvent:
    """One event name, wherever it is logged: its levels, fields, and the modules logging it."""

    name: str
    levels: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)


def _name(arg: ast.expr) -> str | None:
    """The event name: a literal, or an f-string's pattern with ``*`` for each placeholder
    (``entity.{kind}`` is ``entity.*``)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "*" for v in arg.values)
    return None


def _dict_keys(node: ast.expr | None) -> set[str]:
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return set()


def _assigned_keys(scope: ast.AST, variable: str) -> set[str]:
    """Keys a function puts in the dict it passes as ``extra=variable``: its literal, then
    each ``variable["key"] = ...``."""
    keys: set[str] = set()
    for node in ast.walk(scope):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == variable:
                keys |= _dict_keys(node.value)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                    and target.value.id == variable and isinstance(target.slice, ast.Constant):
                keys.add(str(target.slice.value))
    return keys


def _calls(tree: ast.AST) -> Iterator[tuple[str, str, set[str]]]:
    """Each logging call: its event name, level and fields. Calls are found per function, so
    that an ``extra=`` built in a variable is read where it is built."""
    seen: set[int] = set()
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for scope in [*scopes, tree]:
        for node in ast.walk(scope):
            if id(node) in seen or not (
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in LOGGER_NAMES and node.args):
                continue
            seen.add(id(node))
            name = _name(node.args[0])
            if name is None:
                continue
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            keys = _dict_keys(extra)
            if isinstance(extra, ast.Name):
                keys = _assigned_keys(scope, extra.id)
            yield name, node.func.attr, keys


def log_events(package: Path) -> dict[str, LogEvent]:
    """Every event name logged under ``package`` (event-style names only: ``area.what``)."""
    found: dict[str, LogEvent] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for name, level, keys in _calls(tree):
            if "." not in name or " " in name:
                continue
            event = found.setdefault(name, LogEvent(name))
            event.levels.add("error" if level == "exception" else level)
            event.fields |= keys
            if level == "exception":
                event.fields |= {"error", "traceback"}
            event.modules.add(module)
    return found


def markdown(events: dict[str, LogEvent]) -> str:
    """The reference table: event, level, fields."""
    order = {level: i for i, level in enumerate(LEVELS)}
    lines = ["| event | level | fields |", "|---|---|---|"]
    for name in sorted(events):
        event = events[name]
        levels = ", ".join(sorted(event.levels, key=order.__getitem__))
        fields = ", ".join(f"`{f}`" for f in sorted(event.fields)) or "-"
        lines.append(f"| `{name}` | {levels} | {fields} |")
    return "\n".join(lines)


_INTRO = """# Log events

Generated from the worker's source by `make docs-reference`: every event a worker logs, its
level, and the fields it carries. How to read the lines (the two formats, the fields that
recur, the `entity.*` family) is in [observability](../observability.md#logs).

"""


def render_log_events() -> str:
    """The whole page."""
    return _INTRO + markdown(log_events(Path(__file__).resolve().parents[2] / "worker")) + "\n"
