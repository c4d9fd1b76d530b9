"""The client's HTTP transport: one connection pool per process, and a total deadline per call.

requests only bounds each socket operation (connect, then every read): a server that answers a
byte every few seconds keeps a call open for as long as it likes. Under the prefork pool the
task's hard time limit ended such a call by killing the process; the threads pool has no
signal to send, so the deadline is enforced here instead. A watchdog thread (one per process,
started with the first call) shuts the socket of a call still running at its deadline, which
ends the thread's blocked read at once; a connection made after the deadline (a slow name
lookup, which no socket timeout covers) is closed before a byte of the request is sent.

The urllib3 pool is shared by every thread of the process (urllib3's pools are thread-safe);
each thread keeps its own ``requests.Session`` on top of it, since a session's cookies and
settings are not.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError


@dataclass(eq=False)
class CallWatch:
    """One call under its deadline (monotonic seconds)."""

    deadline: float
    #: The connection the call runs on, while it runs on one.
    connection: Any = None
    #: Set by the watchdog: the call was still running at its deadline.
    expired: bool = False
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class CallDeadlines:
    """The watchdog of one process's calls: each call ends by its deadline, whatever the
    server does."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._local = threading.local()
        self._heap: list[tuple[float, int, CallWatch]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def within(self, seconds: float) -> Iterator[CallWatch]:
        """Run the block's call (made from this thread) under a deadline of ``seconds``."""
        watch = CallWatch(self._clock() + seconds)
        with self._wake:
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            self._start_if_needed()
            # Every call has the same length of deadline, so a new one is almost never the
            # earliest: waking the watchdog for each call cost a context switch per call.
            if earliest is None or watch.deadline < earliest:
                self._wake.notify()
        self._local.watch = watch
        try:
            yield watch
        finally:
            self._local.watch = None
            with watch.lock:
                watch.done, watch.connection = True, None

    def current(self) -> CallWatch | None:
        """The call this thread is making, if any."""
        watch: CallWatch | None = getattr(self._local, "watch", None)
        return watch

    def attach(self, connection: Any) -> None:
        """``connection`` now carries this thread's call."""
        watch = self.current()
        if watch is not None:
            with watch.lock:
                watch.connection = connection

    def detach(self, connection: Any) -> None:
        """``connection`` went back to the pool: the watchdog must not touch it any more (the
        next thread to take it has a call of its own)."""
        watch = self.current()
        if watch is not None:
            with watch.lock:
                if watch.connection is connection:
                    watch.connection = None

    def past_deadline(self) -> bool:
        """Whether this thread's call is past its deadline."""
        watch = self.current()
        return watch is not None and (watch.expired or self._clock() >= watch.deadline)

    def _start_if_needed(self) -> None:
        # After a fork the parent's watchdog is gone: the child starts its own.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="http-deadlines",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                # Calls that ended are dropped without waiting for their deadlines: the
                # watchdog would otherwise wake once for every call made (a context switch
                # per call), since each call's deadline comes a few ms after the last one's.
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, _order, watch = self._heap[0]
                delay = deadline - self._clock()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
            self._expire(watch)

    @staticmethod
    def _expire(watch: CallWatch) -> None:
        with watch.lock:
            if watch.done:
                return
            watch.expired = True
            sock = getattr(watch.connection, "sock", None)
            if sock is not None:
                # Wakes the thread blocked reading this socket (a read returns the end of
                # the stream); the pool then discards the connection. The plain socket's
                # shutdown, even under TLS: the TLS socket's own would also drop its TLS
                # state under the reading thread's feet.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watched_connection(base: type[HTTPConnection],
                        deadlines: CallDeadlines) -> type[HTTPConnection]:
    class WatchedConnection(base):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            if deadlines.past_deadline():
                # Connected too late (a name lookup has no timeout): the request would reach
                # Capillary after the call was given up, maybe after the claim was.
                self.close()
                raise ConnectTimeoutError(self, "connected after the call's deadline")

    return WatchedConnection


def _watched_pool(base: type[HTTPConnectionPool], connection: type[HTTPConnection],
                  deadlines: CallDeadlines) -> type[HTTPConnectionPool]:
    class WatchedPool(base):  # type: ignore[valid-type,misc]
        ConnectionCls = connection

        def _get_conn(self, timeout: float | None = None) -> Any:
            conn = super()._get_conn(timeout)
            deadlines.attach(conn)
            return conn

        def _put_conn(self, conn: Any) -> None:
            deadlines.detach(conn)
            super()._put_conn(conn)

    return WatchedPool


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connections are watched by ``deadlines``; one per process,
    mounted on every thread's session."""

    def __init__(self, deadlines: CallDeadlines, *, pool_maxsize: int) -> None:
        self.deadlines = deadlines
        # No automatic retries: re-sending a POST that may have issued a coupon is exactly
        # what must never happen blindly.
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self._watch(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        self._watch(manager)
        return manager

    def _watch(self, manager: Any) -> None:
        manager.pool_classes_by_scheme = {
            "http": _watched_pool(HTTPConnectionPool,
                                  _watched_connection(HTTPConnection, self.deadlines),
                                  self.deadlines),
            "https": _watched_pool(HTTPSConnectionPool,
                                   _watched_connection(HTTPSConnection, self.deadlines),
                                   self.deadlines),
        }
