"""``coupon-worker chaos``: exactly once while everything around the workers fails.

A run, in order:

1. a database and a RabbitMQ vhost of its own (dropped and recreated), the sandbox on a free
   port striking at low rates (a 5xx with a JSON body after issuing, a slow original that lands
   after the client gave up, a reset after issuing, an unreadable read-back), and N workers
   started with the default command ``coupon-worker worker``, restarted when they die, as a
   supervisor would;
2. events published at a steady pace while a script SIGKILLs one worker mid-call, restarts
   RabbitMQ, restarts PostgreSQL, takes the API down and drops every broker connection; a
   timeline says what happened when;
3. once the ledger is at rest, the sandbox's ground truth: every (event, series) issued exactly
   once, compared with our ledger, and every worker alive and consuming.

It restarts the local RabbitMQ node ``rabbitmqctl`` addresses (the machine's, or
``RABBITMQ_NODENAME``'s) and the local PostgreSQL cluster listening on the port of
``COUPONS_DATABASE_URL`` (``pg_ctlcluster``), so it needs both on this host and disturbs
whatever else uses them for a few seconds. Process
handling, backends and the sandbox start are the demo's (:mod:`coupon_devtools.demo`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from coupon_devtools.chaos.cluster import CLUSTER, ClusterChaosRun
from coupon_devtools.chaos.defaults import FULL, SHORT
from coupon_devtools.chaos.run import ChaosOptions, ChaosRun
from coupon_devtools.demo.defaults import DemoError


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_chaos(options: ChaosOptions, console: Console) -> int:
    """Run chaos; the exit code is 0 only if exactly once held and every worker is alive."""
    from coupon_devtools.sandbox import SandboxAdminError
    from worker.domain.errors import WorkerError

    console.print(f"[bold]coupon-worker chaos[/]: {options.profile.events} events through "
                  f"{options.workers} workers while their world falls apart"
                  + (" (on a RabbitMQ cluster whose leader dies)" if options.cluster else ""))
    run = ClusterChaosRun(options, console) if options.cluster else ChaosRun(options, console)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run.run()
    except (DemoError, WorkerError, SandboxAdminError, subprocess.SubprocessError) as exc:
        console.print(f"[bold red]chaos failed:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopping the workers and the sandbox"
                      + ("; database and vhost kept (--keep)" if options.keep else
                         "; dropping the database and the vhost"))
        run.close()


def chaos_command() -> click.Command:
    """The ``chaos`` command, for ``main.add_command(chaos_command())`` in the CLI."""

    @click.command("chaos")
    @click.option("--events", type=click.IntRange(10, 1_000_000), default=None,
                  help=f"Events to publish [default: {FULL.events}, --short {SHORT.events}].")
    @click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True,
                  help="Workers started with `coupon-worker worker`.")
    @click.option("--short", is_flag=True,
                  help="The CI profile: fewer events, shorter outages, no late original.")
    @click.option("--cluster", is_flag=True,
                  help=f"On a 3-node RabbitMQ cluster of its own with quorum queues: SIGKILL "
                       f"the events queue's leader mid-run and bring it back [{CLUSTER.events} "
                       "events]. Leaves the machine's RabbitMQ and PostgreSQL running.")
    @click.option("--pool", type=click.Choice(["prefork", "threads"]), default="prefork",
                  show_default=True, help="The Celery pool of every worker "
                  "(`coupon-worker worker -P`; docs/threads-pool.md).")
    @click.option("--seed", type=int, default=1, show_default=True,
                  help="The sandbox's seed (its codes and which calls the low-rate faults "
                       "strike, as far as the calls' order repeats).")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(".chaos"), show_default=True, help="Where the logs go.")
    @click.option("--keep", is_flag=True,
                  help="Keep the database and the vhost to look into afterwards.")
    @click.option("--namespace", default="", hidden=True,
                  help="Suffix for the database and vhost names (parallel test sessions).")
    def chaos(events: int | None, workers: int, short: bool, cluster: bool, pool: str,
              seed: int, workdir: Path, keep: bool, namespace: str) -> None:
        """Exactly once while a worker is SIGKILLed mid-call, RabbitMQ and PostgreSQL restart,
        the API goes down and every broker connection drops.

        Restarts this machine's RabbitMQ (RABBITMQ_NODENAME's node, if set) and the PostgreSQL
        cluster of COUPONS_DATABASE_URL: do not run it where others rely on them. Exits 0 only
        if nothing is missing, nothing was issued twice and every worker is alive at the end.
        """
        if namespace and not re.fullmatch(r"[a-z0-9]{1,20}", namespace):
            raise click.BadParameter("lower-case letters and digits only", param_hint="namespace")
        if cluster and short:
            raise click.UsageError("--cluster is a profile of its own: drop --short")
        profile = CLUSTER if cluster else SHORT if short else FULL
        if events is not None:
            profile = replace(profile, events=events)
        console = Console(highlight=False, soft_wrap=True)
        sys.exit(run_chaos(ChaosOptions(profile, workers, seed, workdir, keep, namespace,
                                        cluster, pool), console))

    return chaos
