"""``broker``: the quorum queues' policy, and the messages RabbitMQ parked under it."""

from __future__ import annotations

import dataclasses
import json
import logging

import click

from worker.domain.errors import BrokerUnavailable
from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import cli_origin
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit
from worker.entrypoints.cli.root import main

log = logging.getLogger(__name__)


@main.group()
def broker() -> None:
    """The broker's side: the queues' delivery limit and what RabbitMQ parked past it."""


@broker.command("setup")
@click.option("--print", "print_only", is_flag=True,
              help="Print the rabbitmqctl command and the definitions entry; change nothing.")
@click.option("--node", help="The RabbitMQ node rabbitmqctl addresses (-n), if not its "
                             "default.")
def broker_setup(print_only: bool, node: str | None) -> None:
    """Declare the parked queue and set the delivery-limit policy on the consumed queues.

    Needs COUPONS_QUEUE_TYPE=quorum (classic queues have no delivery limit). The policy applies
    to live queues, so it is the upgrade path too: run it once per vhost, before or after the
    workers start; running it again changes nothing.
    """
    from worker.adapters.rabbitmq.parking import (
        apply_policy,
        declare_parking,
        queue_policy,
        vhost_of,
    )

    settings = settings_or_exit()
    if settings.queue_type != "quorum":
        fail("the delivery limit is a quorum queue's: set COUPONS_QUEUE_TYPE=quorum", 2)
    policy, vhost = queue_policy(settings), vhost_of(settings)
    if print_only:
        say("rabbitmqctl " + " ".join(_quoted(arg) for arg in policy.rabbitmqctl_args(vhost)))
        say(json.dumps({"policies": [policy.as_definition(vhost)]}, indent=2))
        return
    try:
        declare_parking(settings)
        apply_policy(policy, vhost, node=node)
    except BrokerUnavailable as exc:
        fail(str(exc))
    log.info("broker.policy_set", extra={"policy": policy.name, "vhost": vhost,
                                         "delivery_limit": settings.delivery_limit,
                                         **cli_origin()})
    say(f"policy {policy.name} set in vhost {vhost}: {settings.events_queue}, "
        f"{settings.tasks_queue} and {settings.retry_queue} park a message delivered more "
        f"than {settings.delivery_limit} times in {settings.parked_queue}")


def _quoted(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}\"|()^$\\") else arg


@broker.command("parked")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def broker_parked(limit: int, as_json: bool) -> None:
    """The messages RabbitMQ parked: from which queue, why, how often each died (they stay)."""
    from worker.adapters.rabbitmq.parking import browse, parked_count

    settings = settings_or_exit()
    try:
        total = parked_count(settings)
        found = browse(settings, limit) if total else []
    except BrokerUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json({"total": total, "messages": [dataclasses.asdict(m) for m in found]})
        return
    say(f"{total} message(s) parked in {settings.parked_queue}"
        + (f"; the first {len(found)}:" if found else ""))
    if not found:
        return
    from rich.table import Table
    from rich.text import Text

    table = Table("from", "reason", "deaths", "task", "ids", "bytes")
    for m in found:
        table.add_row(*(Text(str(cell)) for cell in (
            m.origin or "?", m.reason or "?", m.deaths, m.task or "(bus message)", m.ids or "-",
            m.size_bytes)))
    output.console.print(table)


@broker.command("move-back")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
def broker_move_back(limit: int) -> None:
    """Publish parked messages back to the queues they came from, untouched, once the cause
    is fixed; each leaves the parked queue only after the broker confirmed its copy."""
    from worker.adapters.rabbitmq.parking import move_back, parked_count

    settings = settings_or_exit()
    try:
        if not parked_count(settings):
            say(f"nothing parked in {settings.parked_queue}")
            return
        report = move_back(settings, limit)
    except BrokerUnavailable as exc:
        fail(str(exc))
    moved = sum(report.moved.values())
    log.warning("broker.parked_moved_back", extra={"moved": dict(report.moved),
                                                  "kept": len(report.kept), **cli_origin()})
    say(f"moved {moved} message(s) back"
        + (": " + ", ".join(f"{n} to {q}" for q, n in report.moved.items()) if moved else ""))
    for line in report.kept:
        say(f"kept parked: {line}")
    if report.kept:
        raise SystemExit(1)
