"""Claims renewed by a heartbeat while their task lives, so a dead task's come back in seconds.

A claim is taken with a short lease (``COUPONS_CLAIM_HEARTBEAT_SECONDS`` x 3, at most the
claim deadline ``COUPONS_LEASE_SECONDS``). While the task that holds it runs, a thread of its
process renews the lease every heartbeat, one statement for every claim the process holds, up
to the task's deadline (the hard time limit): a task killed (SIGKILL, a pool process ended by
Celery on a lost broker connection) or hung past its deadline stops renewing, and its entities
come back to the sweeper within one short lease instead of the whole deadline.

A claim whose renewals failed (the database unreachable from this process alone) may lapse
while its task still runs: the task then must not send a call any more, since another worker
may already be reading the entity back. ``HeldClaim.may_send`` says whether the lease the task
last saw renewed still has ``SEND_MARGIN_S`` to run, on this process's monotonic clock, which
starts before the database's own and so ends the lease here first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("worker.pipeline")

#: A claim must have this long left on its lease for its task to send a call.
SEND_MARGIN_S = 1.0

#: Renew the leases of ``entity_ids`` held under each token for ``lease_s`` more seconds; the
#: tokens whose claim is still held (still in flight under that token).
Renew = Callable[[Sequence[str], Sequence[int], float], Collection[str]]


@dataclass
class HeldClaim:
    """One claim a task of this process holds, as the heartbeat last saw it."""

    token: str
    entity_ids: tuple[int, ...]
    deadline: float  # monotonic: renewals stop here (the task's hard time limit)
    valid_until: float  # monotonic: the lease as last taken or renewed
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def may_send(self) -> bool:
        """Whether the task may still send a call under this claim."""
        return self.clock() + SEND_MARGIN_S < self.valid_until


class LeaseKeeper:
    """The heartbeat of one process's claims (a thread, started with the first claim)."""

    def __init__(self, renew: Renew, *, lease_s: float, interval_s: float, deadline_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self._renew = renew
        self._clock = clock
        self._held: dict[str, HeldClaim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid: int | None = None

    @contextmanager
    def hold(self, token: str, entity_ids: Sequence[int], *,
             taken_at: float | None = None) -> Iterator[HeldClaim]:
        """Renew the lease of the claim ``token`` (taken at ``taken_at``, monotonic) while the
        block runs, within the task's deadline."""
        start = self._clock() if taken_at is None else taken_at
        held = HeldClaim(token, tuple(entity_ids), deadline=start + self.deadline_s,
                         valid_until=start + self.lease_s, clock=self._clock)
        with self._lock:
            self._held[token] = held
            self._start_if_needed()
        try:
            yield held
        finally:
            with self._lock:
                self._held.pop(token, None)

    def renew_due(self) -> int:
        """One heartbeat: renew every held claim within its deadline; how many were renewed."""
        started = self._clock()
        with self._lock:
            live = [h for h in self._held.values() if started < h.deadline]
        if not live:
            return 0
        try:
            kept = set(self._renew([h.token for h in live],
                                   [i for h in live for i in h.entity_ids], self.lease_s))
        except Exception as exc:  # noqa: BLE001 - a failed heartbeat only lets leases run out
            log.warning("claims.renew_failed", extra={"claims": len(live), "error": str(exc)})
            return 0
        for held in live:
            if held.token in kept:
                # Measured from before the statement: the database's lease starts later.
                held.valid_until = max(held.valid_until, started + self.lease_s)
        return len(kept)

    def now(self) -> float:
        """This keeper's clock (monotonic): take it before claiming, for ``hold``."""
        return self._clock()

    def _start_if_needed(self) -> None:
        # One thread per process, started in the process that holds claims: a prefork child
        # gets its own after the fork (threads do not survive one).
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="claim-heartbeat", daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            self._wake.wait(self.interval_s)
            self.renew_due()


class UnrenewedLeases:
    """Claims that are never renewed and never refuse a call: for tools and unit tests whose
    claims never outlive their lease."""

    lease_s = float("inf")

    @staticmethod
    def now() -> float:
        return time.monotonic()

    @contextmanager
    def hold(self, token: str, entity_ids: Sequence[int], *,
             taken_at: float | None = None) -> Iterator[HeldClaim]:
        yield HeldClaim(token, tuple(entity_ids), deadline=float("inf"),
                        valid_until=float("inf"))
