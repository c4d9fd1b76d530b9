"""A stand-in Capillary server for tests, the demo and benchmarks.

It answers the coupon APIs the worker calls (``POST /v2/coupon/bulk/issue``, the three
read-backs, OAuth token generation) as the public documentation describes them, keeps a
ground-truth ledger of every coupon it really issued, and injects faults on demand through an
admin API under ``/sandbox/``.

- :mod:`coupon_devtools.sandbox.state`: the in-memory rules, testable without a server, over
  :mod:`~coupon_devtools.sandbox.inputs` (vocabulary, validators),
  :mod:`~coupon_devtools.sandbox.readbacks`, :mod:`~coupon_devtools.sandbox.bulk_requests`,
  :mod:`~coupon_devtools.sandbox.config` (server and series settings),
  :mod:`~coupon_devtools.sandbox.faults`, :mod:`~coupon_devtools.sandbox.scenario` and
  :mod:`~coupon_devtools.sandbox.records` (requests, answers, issued coupons, calls);
- :mod:`coupon_devtools.sandbox.server`: the aiohttp app, :func:`run` and
  :class:`BackgroundSandbox`, with the Capillary routes in
  :mod:`~coupon_devtools.sandbox.capillary_api`, the admin routes in
  :mod:`~coupon_devtools.sandbox.admin_api` and what they share in
  :mod:`~coupon_devtools.sandbox.wire`;
- :mod:`coupon_devtools.sandbox.admin`: :class:`SandboxAdmin`, a client for the admin API;
- :mod:`coupon_devtools.sandbox.command`: ``coupon-worker sandbox``.
"""

from __future__ import annotations

from coupon_devtools.sandbox.admin import SandboxAdmin, SandboxAdminError
from coupon_devtools.sandbox.config import SandboxOptions
from coupon_devtools.sandbox.inputs import SandboxInputError, basic_auth_header
from coupon_devtools.sandbox.scenario import load_scenario
from coupon_devtools.sandbox.server import BackgroundSandbox, create_app, run
from coupon_devtools.sandbox.state import SandboxState

__all__ = [
    "BackgroundSandbox",
    "SandboxAdmin",
    "SandboxAdminError",
    "SandboxInputError",
    "SandboxOptions",
    "SandboxState",
    "basic_auth_header",
    "create_app",
    "load_scenario",
    "run",
]
