"""The ``coupon-worker`` command group, and the dev-tool commands it finds only when asked.

The dev-tool commands live in the ``coupon_devtools`` package (the ``devtools`` extra); the
runtime never imports it, and this command line finds those commands only when one is asked for.
"""

from __future__ import annotations

from typing import NoReturn

import click

# Each dev-tool command: the factory that builds it, as "module:function".
DEVTOOL_COMMANDS: dict[str, str] = {
    "sandbox": "coupon_devtools.sandbox.command:sandbox_command",
    "demo": "coupon_devtools.demo.command:demo_command",
    "bench": "coupon_devtools.bench.command:bench_command",
    "chaos": "coupon_devtools.chaos.command:chaos_command",
}
DEVTOOLS_MISSING = "needs the dev tools: install coupon-worker[devtools]"

# Each command of the runtime: the modules (of this package) whose import registers it and its
# subcommands. Imported when the command is asked for: ``coupon-worker worker`` forks its pool
# from its own process, so every module imported there is resident in each pool process.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "broker": ("broker", "deploy"),
    "circuit": ("circuit",),
    "console": ("webconsole", "console_sessions"),
    "db": ("deploy",),
    "dlq": ("support",),
    "doctor": ("deploy",),
    "duplicates": ("support",),
    "events": ("support",),
    "flower": ("runtime",),
    "health": ("runtime",),
    "migrate": ("runtime",),
    "prune": ("retention",),
    "publish": ("publishing",),
    "rejected": ("rejected",),
    "waiting": ("waiting",),
    "worker": ("runtime",),
}


#: Exit codes of a command that could not do its work, by what stood in the way.
EXIT_NOT_FOUND, EXIT_LEDGER, EXIT_BROKER, EXIT_CAPILLARY = 3, 4, 5, 6


def _readable(exc: Exception) -> tuple[int, str] | None:
    """The exit code and one line for a failure of something outside the command (the
    ledger, the broker, Capillary) or a missing row; None for anything else (a bug: its
    traceback is wanted)."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from sqlalchemy import exc as sa_exc

    from worker.adapters.postgres.driver import translate
    from worker.domain.errors import BrokerUnavailable, CapillaryError, LedgerError, NotFound

    if isinstance(exc, sa_exc.SQLAlchemyError) or type(exc).__module__.startswith("psycopg"):
        exc = translate(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND, first
    if isinstance(exc, LedgerError):
        return EXIT_LEDGER, (f"the ledger failed: {first[:300]} (check COUPONS_DATABASE_URL "
                             "and that PostgreSQL is up)")
    if isinstance(exc, BrokerUnavailable | KombuOperationalError | ConnectionError):
        return EXIT_BROKER, (f"the broker failed: {first[:300]} (check COUPONS_BROKER_URL and "
                             "that RabbitMQ is up)")
    if isinstance(exc, CapillaryError):
        return EXIT_CAPILLARY, (f"Capillary failed: {first[:300]} (check CAPILLARY_BASE_URL "
                                "and the credentials)")
    return None


class _DevToolsGroup(click.Group):
    """A group that imports a dev-tool command only when it is asked for, so that the
    worker's start-up never loads (nor needs) the ``coupon_devtools`` package; and that turns
    a failure of the ledger, the broker or Capillary into one readable line and an exit code
    of its own (``--debug`` shows the traceback instead)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit,
                click.exceptions.Abort):
            raise
        except Exception as exc:
            readable = None if ctx.params.get("debug") else _readable(exc)
            if readable is None:
                raise
            code, line = readable
            click.echo(f"coupon-worker: {line}", err=True)
            ctx.exit(code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMAND_MODULES, *DEVTOOL_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        import importlib

        # Every module of the command, even when one of them was imported already (another
        # module's import of ``webconsole`` registers ``console`` without its subcommands).
        for part in COMMAND_MODULES.get(cmd_name, ()):
            importlib.import_module(f"{__package__}.{part}")
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in DEVTOOL_COMMANDS:
            return command
        module_name, factory = DEVTOOL_COMMANDS[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith(("coupon_devtools", "aiohttp", "pgserver")):
                raise
            return _missing_devtools(cmd_name)
        built: click.Command = getattr(module, factory)()
        return built


def _missing_devtools(name: str) -> click.Command:
    def explain() -> NoReturn:
        raise click.ClickException(f"coupon-worker {name} {DEVTOOLS_MISSING}")

    return click.Command(name, callback=explain, help=f"({DEVTOOLS_MISSING})",
                         context_settings={"ignore_unknown_options": True,
                                           "allow_extra_args": True})


@click.group(cls=_DevToolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coupon-worker")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure instead of one "
              "line.")
def main(debug: bool) -> None:
    """Issue loyalty coupons through Capillary's bulk-issue API, exactly once."""
    import os

    from worker.logs import configure_logging

    # Structured lines on stderr (what an operator did is logged too); tables go to stdout.
    configure_logging(os.environ.get("COUPONS_LOG_LEVEL", "INFO").upper(),
                      "json" if os.environ.get("COUPONS_LOG_FORMAT") == "json" else "kv")

