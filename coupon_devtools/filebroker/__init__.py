"""The demo's no-server broker: kombu's file-based transport, under the URL scheme ``cwfile``.

kombu finds a transport by the URL's scheme in its alias table, so every process that opens
``cwfile://`` must first call :func:`register`: the demo does in its own process, and starts
its children through ``python -m coupon_devtools.filebroker`` (the ``coupon-worker`` command
line with the alias registered). The runtime knows nothing of it.
"""

from __future__ import annotations

from typing import Final

FILE_BROKER_SCHEME: Final = "cwfile"
LAUNCHER_MODULE: Final = "coupon_devtools.filebroker"


def register() -> None:
    """Make ``cwfile://`` URLs resolve to :class:`~coupon_devtools.filebroker.transport.
    Transport` in this process (registering a name is not I/O)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault(FILE_BROKER_SCHEME,
                                 "coupon_devtools.filebroker.transport:Transport")


def uses_file_broker(broker_url: str) -> bool:
    """Whether a broker URL selects this transport."""
    return broker_url.startswith(f"{FILE_BROKER_SCHEME}://")
