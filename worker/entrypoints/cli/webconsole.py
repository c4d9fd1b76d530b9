"""``console``: the support console in the browser, and its password hashing."""

from __future__ import annotations

from typing import Any

import click

from worker.domain.errors import WorkerError
from worker.entrypoints.cli.output import fail, say, settings_or_exit
from worker.entrypoints.cli.root import main

# -- console -------------------------------------------------------------------------------


@main.group("console", invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address (0.0.0.0 in a container).")
@click.option("--port", type=int, default=8780, show_default=True)
@click.pass_context
def console_(ctx: click.Context, host: str, port: int) -> None:
    """The support console in the browser (COUPONS_CONSOLE_* variables configure it)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from worker.entrypoints.console.app import create_app
    from worker.entrypoints.console.config import load_console_settings

    settings = settings_or_exit()
    try:
        console_settings = load_console_settings()
        app = create_app(settings, console_settings)
    except WorkerError as exc:
        fail(str(exc))
    say(f"console on http://{host}:{port}/")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)
    finally:
        close_console(app)


def close_console(app: Any) -> None:
    """What the console opened, let go when it exits: the ledger's pool. (Its publisher's broker
    connections are kombu's, shared by the process, and go with it.)"""
    app.state.console.engine.dispose()



@console_.command("hash-password")
@click.password_option(help="The password to hash (asked twice when not given).")
def console_hash_password(password: str) -> None:
    """Print an argon2 hash for the console's users file."""
    from worker.entrypoints.console.auth import hash_password

    click.echo(hash_password(password))
