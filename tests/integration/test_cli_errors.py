"""A command whose ledger or broker cannot be reached says so in one line, with the setting to
check and an exit code of its own; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).parent / "coupon-worker"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60,
                          check=False, input=stdin,
                          env={**os.environ, "COUPONS_ENV_FILE": "", **env})


@pytest.mark.parametrize("args", [("dlq", "list"), ("events", "show", "e-1"),
                                  ("rejected", "list"), ("duplicates",)])
def test_an_unreachable_ledger_is_one_line_and_exit_code_4(args: tuple[str, ...]) -> None:
    down = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/ledger"
    done = run(*args, COUPONS_DATABASE_URL=down, COUPONS_DB_CONNECT_TIMEOUT_SECONDS="2")
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert "the ledger failed" in done.stderr and "COUPONS_DATABASE_URL" in done.stderr
    debug = run("--debug", *args, COUPONS_DATABASE_URL=down)
    assert "Traceback" in debug.stderr and debug.returncode == 1


def test_an_unreachable_broker_is_one_line_and_exit_code_5() -> None:
    event = '{"eventId": "e-1", "customer": {"id": "1"}, "seriesIds": [1]}'
    done = run("publish", "-", stdin=event,
               COUPONS_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{closed_port()}//")
    assert done.returncode == 5, done.stderr
    assert "Traceback" not in done.stderr
    assert "COUPONS_BROKER_URL" in done.stderr
