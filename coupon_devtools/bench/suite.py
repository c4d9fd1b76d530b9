"""The whole run: the machine, then every scenario asked for, on one stack."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import text

from coupon_devtools.bench.defaults import OVERHEAD_TARGET
from coupon_devtools.bench.machine import Machine, describe_machine
from coupon_devtools.bench.probes import Ceiling, RoundTrips, run_ceiling, run_round_trips
from coupon_devtools.bench.scenarios import (
    BenchOptions,
    Comparison,
    MemoryResult,
    QuotaResult,
    ScaleStep,
    run_comparison,
    run_memory,
    run_quota,
    run_scale,
)
from coupon_devtools.bench.stack import Stack
from coupon_devtools.bench.targets import TargetsResult, run_targets


@dataclass
class BenchReport:
    machine: Machine
    options: dict[str, Any]
    sandbox_ceiling: Ceiling | None = None
    round_trips: list[RoundTrips] = field(default_factory=list)
    comparison: Comparison | None = None
    scale: list[ScaleStep] = field(default_factory=list)
    quota: QuotaResult | None = None
    memory: MemoryResult | None = None
    targets: TargetsResult | None = None


def _versions(stack: Stack) -> tuple[str, str]:
    postgres = rabbit = "?"
    with contextlib.suppress(Exception), stack.engine.connect() as conn:
        postgres = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
    with contextlib.suppress(Exception), stack.connection() as conn:
        conn.connect()
        props = conn.connection.server_properties
        rabbit = str(props.get("version", "?"))
    return postgres, rabbit


def run_bench(options: BenchOptions, say: Callable[[str], None]) -> BenchReport:
    machine = describe_machine()
    scenarios = ("quick", "scale", "quota", "memory", "targets") \
        if options.scenario == "all" else (options.scenario,)
    report_options = {k: (str(v) if isinstance(v, Path) else v)
                      for k, v in asdict(options).items()
                      if k not in ("as_json", "keep", "namespace", "workdir")}
    stack = Stack(options.workdir, log_level=options.log_level, keep=options.keep,
                  namespace=options.namespace, say=say)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        stack.open()
        postgres, rabbit = _versions(stack)
        machine = Machine(**{**asdict(machine), "postgres": postgres, "rabbitmq": rabbit})
        report = BenchReport(machine, report_options)
        if scenarios == ("targets",):
            # Its own runs, cold, measure everything it prints.
            report.targets = run_targets(stack, short=options.short, rounds=options.rounds,
                                         series=options.series)
            return report
        report.sandbox_ceiling = run_ceiling(stack, options)
        if any(s in ("quick", "overhead") for s in scenarios):
            report.round_trips = run_round_trips(stack, options)
            target = OVERHEAD_TARGET if options.scenario in ("overhead", "all") else None
            report.comparison = run_comparison(stack, options, target=target)
        if "scale" in scenarios:
            report.scale = run_scale(stack, options)
        if "quota" in scenarios:
            report.quota = run_quota(stack, options)
        if "memory" in scenarios:
            report.memory = run_memory(stack, options)
        if "targets" in scenarios:
            report.targets = run_targets(stack, short=options.short, rounds=options.rounds,
                                         series=options.series)
        return report
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
