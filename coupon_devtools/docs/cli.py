"""docs/reference/cli.md, rendered from the ``coupon-worker`` click group: every command and
subcommand with its usage, help and options, and the exit codes the command line uses."""

from __future__ import annotations

import inspect
import re

import click

from coupon_devtools.docs.markdown import link_docs_pages
from worker.entrypoints.cli import main
from worker.entrypoints.cli.root import (
    DEVTOOL_COMMANDS,
    EXIT_BROKER,
    EXIT_CAPILLARY,
    EXIT_LEDGER,
    EXIT_NOT_FOUND,
)

HEADER = """\
# Command line

<!-- Generated from the click commands of worker/entrypoints/cli/ by `make docs-reference`:
edit a command's docstring or an option's help there, not this page. -->

Every command is a subcommand of `coupon-worker`, installed with the package; `-h` or `--help`
after any of them prints what this page says about it. Commands marked *(dev tools)* live in
the `coupon_devtools` package and need the `devtools` extra (`make install` includes it);
without it they say `install coupon-worker[devtools]`.
"""


def command_paths() -> list[str]:
    """Every command's path, ``coupon-worker`` and its subcommands at every depth."""
    return [ctx.command_path for _, ctx in _commands()]


def render_cli() -> str:
    """The whole page, as the file holds it."""
    commands = _commands()
    glance = ["| command | what it does |", "|---|---|"]
    glance += [f"| [`{ctx.command_path}`](#{_anchor(ctx.command_path)}) | "
               f"{_cell(_first_paragraph(command.help or ''))}{_devtool(ctx)} |"
               for command, ctx in commands if ctx.parent is not None]
    return "\n".join([
        HEADER,
        "## At a glance\n",
        "\n".join(glance) + "\n",
        _exit_codes(),
        *(_section(command, ctx) for command, ctx in commands),
    ])


def _commands() -> list[tuple[click.Command, click.Context]]:
    # The root's context settings (-h beside --help) as the real command line has them: click
    # keeps the help option of the first context that asks for it.
    return _walk(main, click.Context(main, info_name="coupon-worker", **main.context_settings))


def _walk(command: click.Command, ctx: click.Context) -> list[tuple[click.Command, click.Context]]:
    found = [(command, ctx)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found += _walk(sub, click.Context(sub, info_name=name, parent=ctx,
                                                  **sub.context_settings))
    return found


def _section(command: click.Command, ctx: click.Context) -> str:
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    parts = [f"## `{ctx.command_path}`\n", _text(command.help or "") + _devtool(ctx) + "\n",
             f"```\n{usage}\n```\n"]
    records = [record for param in command.get_params(ctx)
               if (ctx.parent is None or param is not command.get_help_option(ctx))
               and (record := param.get_help_record(ctx)) is not None]
    if records:
        parts.append("\n".join(f"- `{names}`" + (f": {_text(help_)}" if help_ else "")
                               for names, help_ in records) + "\n")
    if isinstance(command, click.Group):
        subs = command.list_commands(ctx)
        parts.append("Subcommands: " + ", ".join(
            f"[`{name}`](#{_anchor(f'{ctx.command_path} {name}')})" for name in subs) + ".\n")
    return "\n".join(parts)


def _exit_codes() -> str:
    return "\n".join([
        "## Exit codes\n",
        "A command that cannot reach what it needs says so in one line on standard error, "
        "naming the setting to check, and exits with a code of its own; "
        "`coupon-worker --debug ...` shows the traceback instead.\n",
        "| code | meaning |",
        "|---|---|",
        "| 0 | done (for `health` and `doctor`: healthy, nothing to change) |",
        "| 1 | anything else: a check that failed (`health`, `doctor`, `chaos`), a bug |",
        "| 2 | bad flags or an invalid configuration |",
        f"| {EXIT_NOT_FOUND} | a missing row: an event, an entity, a rejected message |",
        f"| {EXIT_LEDGER} | the ledger failed (check `COUPONS_DATABASE_URL`) |",
        f"| {EXIT_BROKER} | the broker failed (check `COUPONS_BROKER_URL`) |",
        f"| {EXIT_CAPILLARY} | Capillary failed (check `CAPILLARY_BASE_URL` and the "
        "credentials) |",
        "",
    ])


def _devtool(ctx: click.Context) -> str:
    top = ctx
    while top.parent is not None and top.parent.parent is not None:
        top = top.parent
    return " *(dev tools)*" if top.parent is not None and top.info_name in DEVTOOL_COMMANDS \
        else ""


def _text(help_: str) -> str:
    """A docstring as Markdown: click's markers dropped, what Markdown would read as markup
    (``*``, ``<``) escaped, ``\\b`` blocks kept line by line."""
    text = inspect.cleandoc(help_).split("\f")[0]
    text = text.replace("\b\n", "").replace("\b", "")
    text = text.replace("*", r"\*").replace("<", "&lt;")
    return link_docs_pages(re.sub(r"\n{3,}", "\n\n", text).strip())


def _first_paragraph(help_: str) -> str:
    return inspect.cleandoc(help_).split("\f")[0].split("\n\n")[0]


def _cell(text: str) -> str:
    return _text(text).replace("|", r"\|").replace("\n", " ")


def _anchor(command_path: str) -> str:
    """The id MkDocs' table of contents gives the heading ``coupon-worker dlq list``."""
    return re.sub(r"[^a-z0-9]+", "-", command_path.lower()).strip("-")
