"""``publish``: events onto the bus or as tasks, the way a producer would."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from worker.domain.errors import BrokerUnavailable, EventRejected, WorkerError
from worker.entrypoints.cli.output import fail, say, settings_or_exit
from worker.entrypoints.cli.root import EXIT_BROKER, main

# -- publish -------------------------------------------------------------------------------


def _read_lines(source: str) -> Iterator[tuple[int, str]]:
    stream = sys.stdin if source == "-" else Path(source).open(encoding="utf-8")  # noqa: SIM115
    try:
        text = stream.read()
    finally:
        if stream is not sys.stdin:
            stream.close()
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        # One pretty-printed JSON object rather than JSON lines?
        try:
            json.loads(stripped)
        except ValueError:
            pass
        else:
            yield 1, stripped
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--via", type=click.Choice(["bus", "task"]), default="bus", show_default=True,
              help="bus: plain JSON on the events queue; task: the coupons.issue Celery task.")
@click.option("--no-validate", is_flag=True,
              help="Publish lines as they are, even invalid ones (the worker records them).")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Publish each event this many times (to see duplicates suppressed).")
def publish(source: str, via: str, no_validate: bool, repeat: int) -> None:
    """Publish one event (a JSON object) or a JSON-lines file of events."""
    from worker import tracing
    from worker.bootstrap import open_producer
    from worker.domain.events import parse_event_bytes

    settings = settings_or_exit()
    lines = list(_read_lines(source))
    if not lines:
        fail("no events to publish")
    published = invalid = 0
    # With traces on, each message starts a trace the worker goes on with (docs/tracing.md).
    tracing.setup(settings, component="producer")
    try:
        with open_producer(settings) as producer:
            for number, line in lines:
                body = line.encode("utf-8")
                if not no_validate:
                    try:
                        event = parse_event_bytes(body, max_bytes=settings.max_event_bytes)
                    except EventRejected as exc:
                        say(f"line {number}: not published: {exc.reason}", err=True)
                        invalid += 1
                        continue
                    data: Any = event.to_message()
                else:
                    data = None
                for _ in range(repeat):
                    if via == "bus":
                        producer.publish_raw(body)
                    else:
                        producer.publish_event(data if data is not None else json.loads(line),
                                               via="task")
                    published += 1
    except BrokerUnavailable as exc:
        fail(f"{exc} (published {published}; check COUPONS_BROKER_URL and that RabbitMQ is up)",
             EXIT_BROKER)
    except WorkerError as exc:
        fail(str(exc))
    finally:
        tracing.shutdown()
    say(f"published {published} message(s) to "
        f"{settings.events_queue if via == 'bus' else settings.tasks_queue}"
        + (f"; {invalid} invalid line(s) skipped" if invalid else ""))
    if invalid:
        sys.exit(1)
