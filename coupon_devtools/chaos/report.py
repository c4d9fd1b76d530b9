"""The run's figures and verdict, as a table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from coupon_devtools.chaos.defaults import LATE_ORIGINAL_S, READ_TIMEOUT_S, SETTLE_WINDOW_S
from coupon_devtools.chaos.ground_truth import Comparison
from coupon_devtools.chaos.recovery import Recovery


@dataclass(frozen=True)
class Failover:
    """What a cluster run measured around the SIGKILL of the events queue's leader."""

    killed: str
    new_leader: str | None
    reconnected_s: tuple[float, ...]
    """For each worker that lost its connection, from the kill to its next (its log)."""
    consuming_again_s: float | None
    """From the kill to RabbitMQ counting every worker consuming every queue again, while the
    node is down (polled with rabbitmqctl, which takes a second or more a call)."""
    down_s: float
    back_s: float | None
    """From the node's restart to it being a running member of the cluster again."""
    in_flight: int
    """Entities claimed (a call possibly under way) when the node died."""
    recovered: int
    recovered_s: float | None
    """From the kill to the last of those entities issued (None: one never was)."""
    target_s: float
    parked: int | None = 0
    """Messages RabbitMQ parked past the delivery limit (None: it could not be asked)."""

    @property
    def ok(self) -> bool:
        return (self.consuming_again_s is not None and self.back_s is not None
                and self.parked == 0
                and self.recovered == self.in_flight
                and (self.recovered_s or 0.0) <= self.target_s)

    def rows(self) -> list[tuple[str, str, str]]:
        def secs(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        recovered = ("-" if not self.in_flight else
                     f"{self.recovered}/{self.in_flight} issued, the last "
                     f"{secs(self.recovered_s)} after the kill (target {self.target_s:g} s)")
        return [
            ("leader killed", self.killed,
             f"SIGKILL, down {self.down_s:.1f} s; new leader {self.new_leader or '?'}"),
            ("reconnected", "-" if not self.reconnected_s else
             f"{max(self.reconnected_s) * 1000:.0f} ms",
             f"{len(self.reconnected_s)} workers connected to another node, the slowest this "
             "long after the kill (their logs)"),
            ("failover", secs(self.consuming_again_s),
             "from the kill to RabbitMQ counting every worker on every queue again (at most; "
             "polled with rabbitmqctl)"),
            ("node back", secs(self.back_s), "from its restart to a running cluster member"),
            ("in flight at the kill", str(self.in_flight), recovered),
            ("parked", "?" if self.parked is None else str(self.parked),
             "messages RabbitMQ parked past the delivery limit (coupons.parked)"),
        ]


@dataclass(frozen=True)
class Report:
    """The run's figures and verdict."""

    events: int
    messages: int
    republished: int
    result: Comparison
    late: Comparison | None
    struck: Mapping[str, int]
    calls: Mapping[str, int]
    killed: Sequence[str]
    exited: Sequence[str]
    alive: int
    healthy: int
    workers: int
    consuming: Mapping[str, int]
    settled_s: float | None
    elapsed_s: float
    script_failures: Sequence[str]
    failover: Failover | None = None
    worker_kill: Recovery | None = None

    @property
    def all_alive(self) -> bool:
        return min(self.alive, self.healthy, *self.consuming.values()) >= self.workers

    @property
    def late_ok(self) -> bool:
        """The late original is allowed to issue twice, as long as the ledger flagged it."""
        late = self.late
        return late is None or (not late.missing and not late.strays
                                and late.detected == len(late.twice))

    @property
    def passed(self) -> bool:
        result = self.result
        return (result.exactly_once and not result.disagreements and self.all_alive
                and self.settled_s is not None and self.late_ok and not self.script_failures
                and (self.failover is None or self.failover.ok)
                and (self.worker_kill is None or not self.worker_kill.lost))

    def print(self, console: Console) -> None:
        from rich.table import Table

        r = self.result
        table = Table(title="chaos", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_column()
        table.add_row("events", str(self.events),
                      f"{self.messages} messages ({self.republished} published again after "
                      "a broker error)")
        table.add_row("entities", str(r.expected), "one per event and series")
        table.add_row("issued", str(r.issued), "entities the sandbox issued a coupon for")
        table.add_row("missing", _red_unless_zero(len(r.missing)), "never issued")
        table.add_row("issued twice", _red_unless_zero(len(r.twice) + len(r.strays)),
                      "two coupons for one entity, or one to the wrong customer")
        table.add_row("duplicates detected", str(r.detected), "flagged duplicate_issued")
        table.add_row("dead", str(sum(r.dead.values())),
                      escape(", ".join(f"{n} x {reason}" for reason, n in r.dead.items()))
                      or "-")
        table.add_row("ledger vs sandbox", _red_unless_zero(len(r.disagreements)),
                      "disagreements" if r.disagreements else "agree, coupon by coupon")
        table.add_row("faults struck", str(sum(self.struck.values())),
                      escape("\n".join(f"{n} x {label}" for label, n in
                                       sorted(self.struck.items(), key=lambda kv: -kv[1]))))
        table.add_row("Capillary calls", str(sum(self.calls.values())),
                      ", ".join(f"{n} {path}" for path, n in self.calls.items() if n))
        table.add_row("workers restarted", str(len(self.killed) + len(self.exited)),
                      f"{len(self.killed)} after our SIGKILL, {len(self.exited)} exited on "
                      "their own" if not self.exited else escape("\n".join(self.exited)))
        table.add_row("workers alive", f"{self.alive}/{self.workers}",
                      f"{self.healthy} healthy (fresh heartbeat); RabbitMQ consumers: "
                      + ", ".join(f"{q} {n}" for q, n in self.consuming.items()))
        table.add_row("time to settle",
                      "never" if self.settled_s is None else f"{self.settled_s:.1f} s",
                      "from the last disruption and publish to a ledger at rest")
        table.add_row("elapsed", f"{self.elapsed_s:.1f} s", "since publishing started")
        if self.worker_kill is not None:
            table.add_row(*(escape(cell) for cell in self.worker_kill.row()))
        for row in self.failover.rows() if self.failover else []:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        if self.late is not None:
            late = self.late
            verdict = ("[green]detected[/]" if self.late_ok and late.twice else
                       "[yellow]it landed within the window after all[/]" if self.late_ok
                       else "[bold red]NOT detected[/]")
            console.print(f"late original beyond the settle window ({LATE_ORIGINAL_S:g} s > "
                          f"{READ_TIMEOUT_S:g} s timeout + {SETTLE_WINDOW_S:g} s window, not "
                          f"counted above): {verdict}")
            for line in [*late.twice, *late.missing, *late.strays]:
                console.print(f"  {escape(line)}")
        problems = [*r.missing, *r.twice, *r.strays, *r.disagreements, *self.script_failures]
        if self.passed:
            console.print(f"[bold green]chaos: PASSED[/] - 0 missing, 0 issued twice, "
                          f"{self.alive}/{self.workers} workers alive, at rest "
                          f"{self.settled_s:.1f} s after the last disruption and publish")
            return
        console.print(f"[bold red]chaos: FAILED[/] - {len(r.missing)} missing, "
                      f"{len(r.twice) + len(r.strays)} issued twice, {self.alive}/"
                      f"{self.workers} workers alive"
                      + ("" if self.all_alive else " (or not consuming)")
                      + ("" if self.settled_s is not None else ", never at rest")
                      + (f", {len(r.disagreements)} ledger disagreements"
                         if r.disagreements else "")
                      + (", failover not as promised (see the table)"
                         if self.failover is not None and not self.failover.ok else ""))
        for problem in problems[:20]:
            console.print(f"  {escape(problem)}")
        if len(problems) > 20:
            console.print(f"  ... and {len(problems) - 20} more")


def _red_unless_zero(n: int) -> str:
    return str(n) if n == 0 else f"[bold red]{n}[/]"
