"""A stand-in Capillary server for tests, the demo and benchmarks.

It answers the coupon APIs the worker calls (``POST /v2/coupon/bulk/issue``, the three
read-backs, OAuth token generation) as the public documentation describes them, keeps a
ground-truth ledger of every coupon it really issued, and injects faults on demand through an
admin API under ``/sandbox/``.

- :mod:`coupon_devtools.sandbox.state`: the in-memory rules, testable without a server;
- :mod:`coupon_devtools.sandbox.server`: the aiohttp app, :func:`run` and
  :class:`BackgroundSandbox`;
- :mod:`coupon_devtools.sandbox.admin`: :class:`SandboxAdmin`, a client for the admin API.
"""

from __future__ import annotations

from coupon_devtools.sandbox.admin import SandboxAdmin, SandboxAdminError
from coupon_devtools.sandbox.server import BackgroundSandbox, create_app, run
from coupon_devtools.sandbox.state import (
    SandboxInputError,
    SandboxOptions,
    SandboxState,
    basic_auth_header,
    load_scenario,
)

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
