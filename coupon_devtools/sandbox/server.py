"""The sandbox Capillary server: aiohttp over :class:`~coupon_devtools.sandbox.state.SandboxState`.

One process, one event loop, no access log and no per-request disk I/O, so a benchmark measures
the worker rather than the sandbox. Latency is injected with ``asyncio.sleep`` only.

Start it blocking with :func:`run`, or in a background thread of the current process with
:class:`BackgroundSandbox` (tests and the demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from aiohttp import web

from coupon_devtools.sandbox.admin_api import (
    admin_add_fault,
    admin_calls,
    admin_clear_faults,
    admin_get_config,
    admin_health,
    admin_holds,
    admin_ledger,
    admin_list_faults,
    admin_put_config,
    admin_put_customer,
    admin_put_series,
    admin_put_user,
    admin_release,
    admin_reset,
    admin_revoke_tokens,
    admin_stats,
)
from coupon_devtools.sandbox.capillary_api import bulk_issue, readback_handler, token_generate
from coupon_devtools.sandbox.config import SandboxOptions
from coupon_devtools.sandbox.inputs import (
    Clock,
    Monotonic,
)
from coupon_devtools.sandbox.scenario import load_scenario
from coupon_devtools.sandbox.state import SandboxState
from coupon_devtools.sandbox.tls import make_tls
from coupon_devtools.sandbox.wire import (
    HOLDS_KEY,
    REQUEST_ID_HEADER,
    SHUTDOWN_TIMEOUT_S,
    STATE_KEY,
    Holds,
    request_id_middleware,
)

__all__ = [
    "REQUEST_ID_HEADER",
    "STATE_KEY",
    "BackgroundSandbox",
    "SandboxOptions",
    "create_app",
    "load_scenario",
    "run",
]


def create_app(
    options: SandboxOptions,
    *,
    clock: Clock | None = None,
    monotonic: Monotonic | None = None,
) -> web.Application:
    """Build the sandbox application; ``clock`` and ``monotonic`` let tests control time.

    Raises :class:`~coupon_devtools.sandbox.inputs.SandboxInputError` when the options'
    scenario is invalid.
    """
    app = web.Application(middlewares=[request_id_middleware])
    app[STATE_KEY] = SandboxState(options, clock=clock, monotonic=monotonic)
    app[HOLDS_KEY] = Holds()
    app.router.add_post("/v2/coupon/bulk/issue", bulk_issue)
    app.router.add_post("/v3/oauth/token/generate", token_generate)
    app.router.add_get("/v2/coupon", readback_handler("v2_coupon"))
    app.router.add_get("/v1.1/customer/coupons", readback_handler("v11_customer_coupons"))
    app.router.add_get("/v2/customers/coupons", readback_handler("v2_customers_coupons"))
    app.router.add_post("/sandbox/reset", admin_reset)
    app.router.add_get("/sandbox/health", admin_health)
    app.router.add_get("/sandbox/ledger", admin_ledger)
    app.router.add_get("/sandbox/config", admin_get_config)
    app.router.add_put("/sandbox/config", admin_put_config)
    app.router.add_put("/sandbox/series/{series_id}", admin_put_series)
    app.router.add_put("/sandbox/customers/{customer_id}", admin_put_customer)
    app.router.add_put("/sandbox/users/{username}", admin_put_user)
    app.router.add_post("/sandbox/faults", admin_add_fault)
    app.router.add_delete("/sandbox/faults", admin_clear_faults)
    app.router.add_get("/sandbox/faults", admin_list_faults)
    app.router.add_post("/sandbox/tokens/revoke", admin_revoke_tokens)
    app.router.add_get("/sandbox/calls", admin_calls)
    app.router.add_get("/sandbox/stats", admin_stats)
    app.router.add_get("/sandbox/holds", admin_holds)
    app.router.add_post("/sandbox/release", admin_release)
    return app


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _tls_hosts(host: str) -> list[str]:
    return list(dict.fromkeys([host, "127.0.0.1", "localhost"]))


@contextlib.asynccontextmanager
async def _serving(app: web.Application, host: str, port: int,
                   tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve ``app`` until the block exits (over HTTPS with ``tls``); yields the base URL with
    the bound port."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True, ssl_context=tls)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield _url(host, int(bound_port), "https" if tls else "http")
    finally:
        await runner.cleanup()


def run(host: str, port: int, options: SandboxOptions, tls_dir: Path | None = None) -> None:
    """Serve until SIGINT or SIGTERM (blocking); over HTTPS with ``tls_dir``, where the CA's
    certificate is written.

    Prints ``sandbox listening on http://HOST:PORT`` once connections are accepted; with
    ``port=0`` the printed port is the one the OS chose.
    """
    asyncio.run(_run_until_signalled(host, port, options, tls_dir))


async def _run_until_signalled(host: str, port: int, options: SandboxOptions,
                               tls_dir: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    tls = None if tls_dir is None else make_tls(tls_dir, _tls_hosts(host))
    try:
        async with _serving(create_app(options), host, port,
                            None if tls is None else tls.context) as url:
            if tls is not None:
                print(f"sandbox CA certificate in {tls.ca_file} "
                      f"(for clients: REQUESTS_CA_BUNDLE={tls.ca_file})", flush=True)
            print(f"sandbox listening on {url}", flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


class BackgroundSandbox:
    """A sandbox on its own event loop in a daemon thread of this process.

    Use as a context manager; :attr:`url` is the base URL (``port=0`` picks a free port)::

        with BackgroundSandbox(SandboxOptions()) as sandbox:
            SandboxAdmin(sandbox.url).reset()

    With ``tls_dir`` it serves HTTPS, with a certificate from a CA made for it; clients trust
    :attr:`ca_file` (``REQUESTS_CA_BUNDLE``).
    """

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        monotonic: Monotonic | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self._tls = None if tls_dir is None else make_tls(tls_dir, _tls_hosts(host))
        self._app = create_app(
            options if options is not None else SandboxOptions(), clock=clock, monotonic=monotonic
        )
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._url: str | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``; only valid once started."""
        if self._url is None:
            raise RuntimeError("sandbox is not running")
        return self._url

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate to trust when serving HTTPS; None over plain HTTP."""
        return None if self._tls is None else self._tls.ca_file

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving and wait until connections are accepted; returns the base URL."""
        if self._thread is not None:
            raise RuntimeError("sandbox already started")
        self._thread = threading.Thread(target=self._thread_main, name="sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"sandbox did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("sandbox failed to start") from self._error
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread (in-flight stalled calls are cut short)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"sandbox did not stop within {timeout_s} s")
        self._thread = None
        self._url = None

    def __enter__(self) -> BackgroundSandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except OSError as exc:
            # Typically the port is taken; start() re-raises it in the caller's thread.
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tls = None if self._tls is None else self._tls.context
        async with _serving(self._app, self._host, self._port, tls) as url:
            self._url = url
            self._ready.set()
            await self._stop.wait()
