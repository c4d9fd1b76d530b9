"""``circuit``: the fleet-wide circuit breaker, read and moved by hand (audited)."""

from __future__ import annotations

import dataclasses

import click

from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import parse_duration_s, support_deps
from worker.entrypoints.cli.output import fail, print_json, say
from worker.entrypoints.cli.root import main


@main.group()
def circuit() -> None:
    """The circuit breaker in front of Capillary: see it, open it, close it."""


@circuit.command("status")
@click.option("--json", "as_json", is_flag=True)
def circuit_status(as_json: bool) -> None:
    """Whether the fleet calls Capillary now, and if not why and until when."""
    from worker.usecases.circuit_control import circuit_state

    with support_deps() as deps:
        state = circuit_state(deps)
    if as_json:
        print_json(dataclasses.asdict(state))
        return
    opened = state.state != "closed"
    output.console.print(
        f"circuit {state.state}" + (f" until {state.open_until:%Y-%m-%d %H:%M:%S}Z"
                                    if opened and state.open_until else "")
        + (f": {state.reason}" if opened and state.reason else "")
        + f" ({state.consecutive_failures} failures in a row, opened {state.times_opened} "
          "times in a row)", highlight=False, markup=False)


@circuit.command("open")
@click.option("--for", "duration", required=True, help="How long: 90s, 10m, 2h.")
@click.option("--reason", required=True, help="Why (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
def circuit_open(duration: str, reason: str, operator: str | None) -> None:
    """Stop every call to Capillary until the time given (e.g. Capillary asked us to stop);
    events wait, nothing is spent. Then one worker probes, as after any opening."""
    from worker.usecases.circuit_control import open_circuit
    from worker.usecases.support import default_operator

    for_s = parse_duration_s(duration, bare_unit="s")
    with support_deps() as deps:
        try:
            state = open_circuit(deps, for_s=for_s, reason=reason,
                                 operator=operator or default_operator())
        except ValueError as exc:
            fail(str(exc), 2)
    say(f"circuit open until {state.open_until:%Y-%m-%d %H:%M:%S}Z: no call to Capillary "
        "until then (coupon-worker circuit close ends it sooner)")


@circuit.command("close")
@click.option("--reason", required=True, help="Why (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
def circuit_close(reason: str, operator: str | None) -> None:
    """Close the circuit now (the key or the configuration is fixed): the fleet calls
    Capillary again within a second instead of at its next probe."""
    from worker.usecases.circuit_control import close_circuit
    from worker.usecases.support import default_operator

    with support_deps() as deps:
        try:
            close_circuit(deps, reason=reason, operator=operator or default_operator())
        except ValueError as exc:
            fail(str(exc), 2)
    say("circuit closed: the fleet calls Capillary again")
