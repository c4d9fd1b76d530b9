"""What the commands print: tables and lines on stdout, errors on stderr, JSON for scripts.

Every command prints through ``console`` here (tests swap it for a wide one), and quotes outside
data only as escaped text, never as markup.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

from worker.config import Settings, load_settings
from worker.domain.errors import ConfigurationError
from worker.domain.text import printable

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1, *, multiline: bool = False) -> NoReturn:
    # Messages quote ids and reasons from the ledger: shown as text, never as markup, and on
    # one line unless they are ours to break (the configuration's list of problems).
    text = printable(message, keep="\n" if multiline else "")
    err_console.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False)
    sys.exit(code)


def say(message: str, *, err: bool = False) -> None:
    """One line that may quote outside data: plain text, control characters escaped."""
    (err_console if err else console).print(Text(printable(message)), highlight=False)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(str(exc), 2, multiline=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
