"""``coupon-worker demo``: the whole pipeline on one machine, faults included, in a few minutes.

What a run does, in order:

1. chooses its backends and says which: the local PostgreSQL and RabbitMQ when they answer,
   else an embedded PostgreSQL (``pgserver``) and kombu's file-based broker in the work folder;
2. migrates a database of its own, then starts the sandbox Capillary server, a real worker and
   Flower as subprocesses, each logging to a file in the work folder;
3. publishes tier-upgrade events through both ways in (the plain-JSON bus and Celery tasks),
   some of them twice, plus a few malformed messages, while the sandbox times out, fails after
   issuing, answers 503, refuses an expired series and an unknown customer;
4. watches the ledger drain, then prints what happened and checks the ledger against the
   sandbox's ground truth: every coupon issued is recorded, and none twice;
5. stops everything it started (unless ``--keep``).
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import get_args

import click
from rich.console import Console
from rich.markup import escape

from coupon_devtools.demo.backends import Backends, Database, choose_backends
from coupon_devtools.demo.defaults import FILE_BROKER_COMFORT, Backend, DemoError, display
from coupon_devtools.demo.progress import inject_faults, publish_batch, watch_progress
from coupon_devtools.demo.scenario import plan_scenario, write_scenario
from coupon_devtools.demo.services import (
    Service,
    cleanup,
    demo_env,
    migrate,
    save_state,
    start_processes,
    stop_kept,
)
from coupon_devtools.demo.summary import print_next_steps, print_summary, summarise
from coupon_devtools.harness.processes import (
    free_port,
)
from worker.domain.errors import WorkerError


@dataclass(frozen=True)
class DemoOptions:
    """The command's options."""

    events: int
    timeout_s: float
    backend: Backend
    workdir: Path
    flower: bool
    keep: bool
    namespace: str = ""
    console: bool = True


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same road as Ctrl-C, so the finally block stops the children.
    raise KeyboardInterrupt


def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; returns the exit code (0: drained and exactly once)."""
    from coupon_devtools.sandbox import SandboxAdminError

    started = time.monotonic()
    workdir = options.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    stop_kept(workdir, console)
    console.print(f"[bold]coupon-worker demo[/]: {options.events} tier-upgrade events through "
                  "the real worker, with faults")
    services: list[Service] = []
    database: Database | None = None
    keep = False  # only a run that got to the end leaves its processes running
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        backends = choose_backends(options.backend, workdir, namespace=options.namespace)
        database = backends.database
        console.print(f"  PostgreSQL  {escape(backends.database.label)}")
        console.print(f"  broker      {escape(backends.broker.label)}")
        code = _run_pipeline(options, backends, workdir, services, console, started)
        if options.keep:
            save_state(workdir, services, backends.database)
            keep = True
        return code
    except (DemoError, WorkerError, SandboxAdminError) as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep and (services or (database and database.pgdata)):
            console.print("stopping what the demo started...")
        cleanup(services, database, keep=keep)


def _run_pipeline(options: DemoOptions, backends: Backends, workdir: Path,
                  services: list[Service], console: Console, started: float) -> int:
    from sqlalchemy import create_engine

    from worker.config import Settings

    logs = workdir / "logs"
    plan = plan_scenario(options.events)
    scenario = write_scenario(plan, workdir / "scenario.json")
    console.print(f"  scenario    {plan.describe()}")
    if backends.broker.folder is not None and options.events > FILE_BROKER_COMFORT:
        console.print(f"  note        the file-based broker lists its folder for every message, "
                      f"so beyond about {FILE_BROKER_COMFORT} events it slows down a lot")
    sandbox_port, metrics_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env = demo_env(backends, sandbox_url, metrics_port)
    migrate(env, logs)
    login = start_processes(env, scenario, logs, sandbox_port=sandbox_port,
                            flower=options.flower, services=services, console=options.console)
    for service in services:
        console.print(f"  {service.name:<11} {service.url or 'demo@' + socket.gethostname()}"
                      f"  (pid {service.process.pid}, log {display(service.log_path)})")
    inject_faults(sandbox_url, plan)

    engine = create_engine(backends.database.url, pool_size=2)
    try:
        publish_started = time.monotonic()
        publish_batch(Settings.model_validate(env), plan)
        drained, last = watch_progress(engine, plan, f"http://127.0.0.1:{metrics_port}/metrics",
                                       options.timeout_s, console, services)
        drain_s = time.monotonic() - publish_started
        if not drained:
            console.print(f"[bold red]not drained after {options.timeout_s:g} s[/]: "
                          f"{len(plan.events) - last.events_at_rest} events not at rest; "
                          f"entities by state: {dict(last.entities)}")
        outcome = summarise(engine, sandbox_url, last.taken_in)
    finally:
        engine.dispose()
    print_summary(console, plan, outcome, drained=drained, drain_s=drain_s,
                  total_s=time.monotonic() - started)
    flower_url = next((s.url for s in services if s.name == "flower"), None)
    print_next_steps(console, backends, outcome, flower_url, keep=options.keep, workdir=workdir,
                     login=login)
    return 0 if drained and outcome.exactly_once else 1


def demo_command() -> click.Command:
    """The ``demo`` command, for ``main.add_command(demo_command())`` in the CLI."""

    @click.command("demo")
    @click.option("--events", type=click.IntRange(10, 100_000), default=300, show_default=True,
                  help="Distinct tier-upgrade events to publish.")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=180.0,
                  show_default=True, help="Seconds to wait for the ledger to drain.")
    @click.option("--backend", type=click.Choice(get_args(Backend)), default="auto",
                  show_default=True,
                  help="auto: local PostgreSQL and RabbitMQ when they answer, embedded ones "
                       "otherwise; local or embedded: force one.")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(".demo"), show_default=True,
                  help="Work folder: logs, scenario, embedded database and file broker.")
    @click.option("--flower/--no-flower", default=True, show_default=True,
                  help="Start Flower to watch the tasks.")
    @click.option("--console/--no-console", "with_console", default=True, show_default=True,
                  help="Start the support console, with a login made for this run.")
    @click.option("--keep", is_flag=True,
                  help="Leave everything running at the end (stop it with --stop).")
    @click.option("--stop", is_flag=True,
                  help="Only stop what an earlier --keep run left running in --workdir.")
    @click.option("--namespace", default="", hidden=True,
                  help="Suffix for the database and vhost names, so parallel runs (tests) do "
                       "not collide.")
    def demo(events: int, timeout_s: float, backend: Backend, workdir: Path, flower: bool,
             with_console: bool, keep: bool, stop: bool, namespace: str) -> None:
        """Run the whole pipeline on this machine: sandbox Capillary, worker, Flower, faults.

        Uses the local PostgreSQL and RabbitMQ when they answer, else embedded ones, and
        checks at the end that every coupon was issued exactly once.
        """
        console = Console(highlight=False, soft_wrap=True)
        if stop:
            if not stop_kept(workdir.resolve(), console):
                console.print(f"nothing left running in {display(workdir.resolve())}")
            return
        if namespace and not re.fullmatch(r"[a-z0-9]{1,20}", namespace):
            raise click.BadParameter("lower-case letters and digits only", param_hint="namespace")
        code = run_demo(DemoOptions(events, timeout_s, backend, workdir, flower, keep,
                                    namespace, with_console), console)
        sys.exit(code)

    return demo
