"""``coupon-worker doctor``: a deployment's settings checked against the capacity guide.

The arithmetic (docs/capacity.md) lives in ``ConnectionBudget``; what the deployment is made of
(its settings, the fleet the operator plans, what PostgreSQL and RabbitMQ answer) in
``Facts``; each check is a function of the facts that returns findings, each with what to
change. ``observe`` gathers the facts from the live services where they answer; a service that
does not answer is a finding too, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from worker.config import Settings, is_loopback

Severity = Literal["problem", "warning", "ok"]
Pool = Literal["prefork", "threads"]
#: What a support command, ``migrate`` or this doctor holds at most while it runs.
TOOL_CONNECTIONS = 2
#: Connections kept free of the fleet's budget for people and tools (psql, backups,
#: monitoring), beyond PostgreSQL's reserved superuser slots.
SPARE_CONNECTIONS = 10
#: Above this share of what the server allows, the fleet's worst case leaves too little room.
WARN_SHARE = 0.8
#: The port PgBouncer and most poolers listen on by convention.
POOLER_PORTS = frozenset({6432})
#: One call's latency assumed when none is given: the benchmark's median against the sandbox
#: is far lower; Capillary's own bulk-issue calls are typically a few hundred milliseconds.
DEFAULT_CALL_LATENCY_S = 0.5


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found, and what to change about it."""

    severity: Severity
    check: str
    message: str
    change: str = ""


@dataclass(frozen=True)
class ConnectionBudget:
    """How many ledger connections a fleet may open (docs/capacity.md).

    A prefork worker is a main process (consumer, sweeper, metrics) and ``concurrency``
    children; each process has its own pool, which opens connections as they are needed, up
    to ``2 x pool_size``, and keeps them. A prefork child runs one task at a
    time and uses one connection at a time, so it holds one most of the time: ``typical``.

    A threads worker is one process: its ``concurrency`` threads share its one pool, each
    holding a connection only around its two short commits, so the pool may be far smaller
    than the thread count (a thread that finds every connection busy waits for one).
    """

    workers: int
    concurrency: int
    pool_size: int
    consoles: int = 1
    tools: int = 1
    pool: Pool = "prefork"

    @property
    def processes(self) -> int:
        if self.pool == "threads":
            return self.workers
        return self.workers * (self.concurrency + 1)

    def describe(self) -> str:
        """How the worst case is counted, in the settings' words."""
        if self.pool == "threads":
            return (f"{self.workers} threads worker(s) x 1 process x 2 x "
                    f"COUPONS_DB_POOL_SIZE={self.pool_size}")
        return (f"{self.workers} worker(s) x ({self.concurrency} + 1) processes x "
                f"2 x COUPONS_DB_POOL_SIZE={self.pool_size}")

    @property
    def per_process(self) -> int:
        return 2 * self.pool_size

    @property
    def worst_case(self) -> int:
        return ((self.processes + self.consoles) * self.per_process
                + self.tools * TOOL_CONNECTIONS)

    @property
    def typical(self) -> int:
        if self.pool == "threads":
            # Its threads' peaks open the whole pool, which is then kept open.
            return self.processes * 2 * self.pool_size + self.consoles * self.pool_size \
                + self.tools
        return self.processes + self.consoles * self.pool_size + self.tools

    def largest_pool_size(self, available: int) -> int:
        """The largest ``pool_size`` whose worst case fits in ``available`` (0: none does)."""
        room = available - self.tools * TOOL_CONNECTIONS
        return max(room // (2 * (self.processes + self.consoles)), 0)


@dataclass(frozen=True)
class DatabaseFacts:
    max_connections: int
    reserved_connections: int
    server_port: int | None = None
    superuser: bool = False
    in_use: int = 0

    @property
    def available(self) -> int:
        """Connections the fleet may use: all but the reserved ones and a few spare."""
        return max(self.max_connections - self.reserved_connections - SPARE_CONNECTIONS, 0)


@dataclass(frozen=True)
class Facts:
    """What the doctor judges: the settings, the planned fleet and what the services said."""

    settings: Settings
    workers: int
    concurrency: int
    pooler_setting: str | None
    database: DatabaseFacts | None = None
    database_error: str | None = None
    broker_nodes: int | None = None
    broker_error: str | None = None
    call_latency_s: float = DEFAULT_CALL_LATENCY_S
    pool: Pool = "prefork"

    @property
    def budget(self) -> ConnectionBudget:
        return ConnectionBudget(self.workers, self.concurrency, self.settings.db_pool_size,
                                pool=self.pool)


def pooler_setting(settings: Settings) -> str:
    """``COUPONS_DB_POOLER``: ``none`` or ``transaction``."""
    return settings.db_pooler


def check_connections(facts: Facts) -> list[Finding]:
    budget, db = facts.budget, facts.database
    counts = (f"{budget.describe()}, plus the console and a tool: "
              f"at most {budget.worst_case} connections, typically {budget.typical}")
    if db is None:
        return [Finding("warning", "connections",
                        f"{counts}; PostgreSQL's max_connections is unknown "
                        f"({facts.database_error or 'not asked'})",
                        "run the doctor where the database answers, or pass --max-connections")]
    limit = (f"max_connections={db.max_connections} leaves {db.available} for the fleet "
             f"({db.reserved_connections} reserved, {SPARE_CONNECTIONS} spare)")
    pooled = _pooler_detected(facts)
    if pooled:
        return [Finding("ok", "connections",
                        f"{counts}, to a pooler: its own pool size bounds PostgreSQL's "
                        f"connections ({limit})",
                        "keep the pooler's default_pool_size x databases below that")]
    if budget.worst_case > db.available:
        fits = budget.largest_pool_size(db.available)
        options = [f"raise max_connections to at least "
                   f"{budget.worst_case + db.reserved_connections + SPARE_CONNECTIONS}"]
        if fits >= 1:
            options.insert(0, f"set COUPONS_DB_POOL_SIZE={fits}")
        options.append("or put PgBouncer in transaction mode in front "
                       "(COUPONS_DB_POOLER=transaction)")
        return [Finding("problem", "connections", f"{counts}; {limit}",
                        "; ".join(options))]
    if budget.worst_case > WARN_SHARE * db.available:
        roomy = max(budget.largest_pool_size(int(WARN_SHARE * db.available)), 1)
        return [Finding("warning", "connections", f"{counts}; {limit}: little room left",
                        f"set COUPONS_DB_POOL_SIZE={roomy} or raise max_connections")]
    return [Finding("ok", "connections", f"{counts}; {limit}")]


def check_quorum(facts: Facts) -> list[Finding]:
    if facts.settings.queue_type != "quorum":
        if facts.broker_nodes is not None and facts.broker_nodes >= 3:
            return [Finding("warning", "queues",
                            f"classic queues on a {facts.broker_nodes}-node cluster: a node "
                            "lost takes its queues' messages with it",
                            "COUPONS_QUEUE_TYPE=quorum (on fresh queue names, or after "
                            "draining the classic ones)")]
        return [Finding("ok", "queues", "classic queues")]
    if facts.broker_nodes is None:
        return [Finding("warning", "queues",
                        f"quorum queues, on a broker of unknown size ({facts.broker_error})",
                        "pass --broker-nodes N (or enable the management API)")]
    if facts.broker_nodes == 1:
        return [Finding("problem", "queues",
                        "quorum queues on a single-node broker: nothing is replicated, and "
                        "every message costs a write-ahead log and more memory than a classic "
                        "queue",
                        "COUPONS_QUEUE_TYPE=classic on one node, or run 3 nodes")]
    if facts.broker_nodes == 2:
        return [Finding("warning", "queues",
                        "quorum queues on 2 nodes: losing either one stops them (no majority)",
                        "run 3 (or 5) nodes")]
    return [Finding("ok", "queues", f"quorum queues on {facts.broker_nodes} nodes")]


def _pooler_detected(facts: Facts) -> bool:
    url_port = urlsplit(facts.settings.database_url).port or 5432
    if facts.database is not None and facts.database.server_port is not None:
        return facts.database.server_port != url_port
    return url_port in POOLER_PORTS


def check_pooler(facts: Facts) -> list[Finding]:
    setting = (facts.pooler_setting or "").lower() or None
    if setting == "none":
        setting = None
    if not _pooler_detected(facts):
        return [Finding("ok", "pooler", "direct connections to PostgreSQL"
                        + (f" (COUPONS_DB_POOLER={setting})" if setting else ""))]
    how = ("the server answers on another port than the URL's"
           if facts.database and facts.database.server_port else
           "the URL's port is a pooler's")
    if setting != "transaction":
        return [Finding("problem", "pooler",
                        f"a pooler sits between the workers and PostgreSQL ({how}) but "
                        f"COUPONS_DB_POOLER is {setting or 'unset'}: prepared statements and "
                        "session settings break on a pooler in transaction mode",
                        "set COUPONS_DB_POOLER=transaction (unless the pooler runs in session "
                        "mode, where a server connection stays with one client)")]
    return [Finding("ok", "pooler", f"a pooler ({how}), COUPONS_DB_POOLER=transaction")]


def check_privileges(facts: Facts) -> list[Finding]:
    found: list[Finding] = []
    if facts.database is not None and facts.database.superuser:
        found.append(Finding("warning", "privileges",
                             "the ledger is used as a PostgreSQL superuser",
                             "connect as the worker's role (`coupon-worker db roles`, "
                             "docs/security.md)"))
    broker_user = urlsplit(facts.settings.broker_url).username
    if broker_user == "guest" and not is_loopback(urlsplit(facts.settings.broker_url).hostname
                                                  or ""):
        found.append(Finding("warning", "privileges", "RabbitMQ's guest user, over the network",
                             "a user per component (`coupon-worker broker users`)"))
    api = urlsplit(facts.settings.capillary_base_url)
    if api.scheme == "http" and not is_loopback(api.hostname or ""):
        found.append(Finding("warning", "privileges",
                             f"Capillary over plain http ({api.hostname}): credentials in "
                             "clear text",
                             "https://, and CAPILLARY_ALLOW_INSECURE_HTTP=false, outside the "
                             "sandbox"))
    return found or [Finding("ok", "privileges", "no superuser, no guest, no plain http")]


def check_quota(facts: Facts) -> list[Finding]:
    quota = facts.settings.rate_limit_per_minute
    slots = facts.workers * facts.concurrency
    if quota is None:
        return [Finding("ok", "quota", f"no rate limit: {slots} calls at once at most")]
    needed = math.ceil(quota / 60.0 * facts.call_latency_s)
    if slots < needed:
        return [Finding("warning", "quota",
                        f"COUPONS_RATE_LIMIT_PER_MINUTE={quota} at {facts.call_latency_s:g} s "
                        f"per call needs {needed} calls in flight; the fleet runs {slots}",
                        f"run at least {math.ceil(needed / max(facts.concurrency, 1))} "
                        f"workers of concurrency {facts.concurrency}")]
    return [Finding("ok", "quota", f"{slots} calls in flight for the {needed} the quota needs")]


#: Below this latency a call is short enough for a process per call (prefork); above, the
#: pool of threads carries the calls in flight for a fraction of the memory.
THREADS_FROM_LATENCY_S = 0.2
#: Calls in flight from which prefork's memory (a process each) is worth the threads pool.
THREADS_FROM_CONCURRENCY = 16
#: A ledger connection's time per event under the threads pool: the claim's commit and the
#: outcome's, a few milliseconds each (docs/threads-pool.md).
LEDGER_HOLD_PER_EVENT_S = 0.01
#: Events a second one threaded process carries before its one core (the interpreter's lock)
#: is the limit rather than Capillary: a core over the ~4 ms of CPU an event costs on the
#: threads pool (``coupon-worker bench --scenario targets``).
THREADS_CPU_BOUND_EVENTS_S = 250.0


def check_pool(facts: Facts) -> list[Finding]:
    """Which pool for the latency (docs/threads-pool.md's sizing guide), and, on threads, a
    ledger pool that keeps up with the threads."""
    latency, concurrency = facts.call_latency_s, facts.concurrency
    rate = concurrency / max(latency, 1e-3)
    if facts.pool == "prefork":
        if latency >= THREADS_FROM_LATENCY_S and concurrency >= THREADS_FROM_CONCURRENCY:
            return [Finding("warning", "pool",
                            f"prefork x {concurrency} for {latency:g} s calls: a process per "
                            "call in flight, each with its own memory and connections",
                            f"run `coupon-worker worker -P threads -c {concurrency}`: one "
                            "process, a thread per call")]
        return [Finding("ok", "pool", f"prefork x {concurrency} for {latency:g} s calls")]
    found = []
    if rate > THREADS_CPU_BOUND_EVENTS_S:
        found.append(Finding(
            "warning", "pool",
            f"threads x {concurrency} at {latency:g} s per call asks one process for "
            f"{rate:.0f} events/s: beyond what its one core carries "
            f"(about {THREADS_CPU_BOUND_EVENTS_S:.0f})",
            f"run {math.ceil(rate / THREADS_CPU_BOUND_EVENTS_S)} threads workers of "
            f"-c {math.ceil(concurrency * THREADS_CPU_BOUND_EVENTS_S / rate)}, or prefork "
            "for calls this short"))
    busy = rate * LEDGER_HOLD_PER_EVENT_S
    # The sweeper and the claims' heartbeat take one each besides the threads' commits.
    needed = math.ceil(2 * busy) + 2
    if 2 * facts.settings.db_pool_size < needed:
        found.append(Finding(
            "warning", "pool",
            f"threads x {concurrency} at {latency:g} s per call keep about {busy:.1f} ledger "
            f"connections busy; COUPONS_DB_POOL_SIZE={facts.settings.db_pool_size} allows "
            f"{2 * facts.settings.db_pool_size} with the overflow",
            f"set COUPONS_DB_POOL_SIZE={math.ceil(needed / 2)}"))
    return found or [Finding("ok", "pool",
                             f"threads x {concurrency} for {latency:g} s calls: about "
                             f"{busy:.1f} of {facts.settings.db_pool_size} ledger connections "
                             "busy, one HTTP connection per thread")]


CHECKS: tuple[Callable[[Facts], list[Finding]], ...] = (
    check_connections, check_pooler, check_quorum, check_privileges, check_quota, check_pool)


def examine(facts: Facts) -> list[Finding]:
    return [finding for check in CHECKS for finding in check(facts)]


def has_problems(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "problem" for f in findings)


def as_dicts(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]


# -- the live services ---------------------------------------------------------------------


def observe_database(database_url: str, *, connect_timeout_s: int = 5) -> DatabaseFacts:
    """What PostgreSQL says (raises psycopg.Error when it does not answer)."""
    from worker.adapters.postgres.roles import connect

    with connect(database_url, connect_timeout_s=connect_timeout_s) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int, "
            "current_setting('superuser_reserved_connections')::int "
            "+ coalesce(current_setting('reserved_connections', true)::int, 0), "
            "inet_server_port(), "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user), "
            "(SELECT count(*) FROM pg_stat_activity)::int").fetchone()
    assert row is not None
    return DatabaseFacts(max_connections=row[0], reserved_connections=row[1],
                         server_port=row[2], superuser=bool(row[3]), in_use=row[4])


def observe_broker_nodes(settings: Settings, *, timeout_s: float = 3.0) -> int:
    """Running nodes in the broker's cluster, from its management API (raises OSError or
    ValueError when it does not answer)."""
    import requests

    parts = urlsplit(settings.broker_url)
    api = f"http://{parts.hostname}:15672/api/nodes"
    try:
        answer = requests.get(api, auth=(parts.username or "", parts.password or ""),
                              timeout=timeout_s)
    except requests.RequestException as exc:
        raise OSError(f"management API at {api}: {exc.__class__.__name__}") from exc
    if answer.status_code != 200:
        raise ValueError(f"management API at {api}: HTTP {answer.status_code}")
    return sum(1 for node in answer.json() if node.get("running"))
