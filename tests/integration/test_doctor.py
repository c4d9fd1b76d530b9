"""``coupon-worker doctor`` against the running PostgreSQL (directly and through a real
PgBouncer of this test's own) and RabbitMQ: each finding, and the exit code."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import run_cli
from worker.config import Settings


def doctor(settings: Settings, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = run_cli(settings, "doctor", "--json", *args)
    report = json.loads(result.stdout)
    assert report["problems"] == (result.exit_code == 1), result.output
    return result.exit_code, {f["check"]: f for f in report["findings"]}


def test_a_small_fleet_fits_and_a_superuser_is_warned(settings: Settings) -> None:
    code, found = doctor(settings, "--workers", "1", "--concurrency", "1")
    assert code == 0
    assert found["connections"]["severity"] == "ok"
    assert "max_connections=" in found["connections"]["message"]
    # the test suite's database user is PostgreSQL's superuser
    assert found["privileges"]["severity"] == "warning"
    assert "db roles" in found["privileges"]["change"]


def test_a_fleet_beyond_the_servers_max_connections_fails(settings: Settings) -> None:
    code, found = doctor(settings, "--workers", "40", "--concurrency", "8")
    assert code == 1
    assert found["connections"]["severity"] == "problem"
    assert "raise max_connections" in found["connections"]["change"]


def test_an_unreachable_database_is_reported_not_crashed_on(
        settings_factory: Callable[..., Settings]) -> None:
    gone = settings_factory(database_url="postgresql+psycopg://postgres@127.0.0.1:1/x",
                            db_connect_timeout_s=2)
    code, found = doctor(gone, "--workers", "1", "--concurrency", "1")
    assert code == 0
    assert found["connections"]["severity"] == "warning"
    assert "did not answer" in found["connections"]["message"]
    # and --max-connections judges without asking
    code, found = doctor(gone, "--workers", "40", "--concurrency", "8",
                         "--max-connections", "100")
    assert code == 1 and found["connections"]["severity"] == "problem"


def test_quorum_queues_on_this_single_node_broker_fail(
        settings_factory: Callable[..., Settings]) -> None:
    quorum = settings_factory(queue_type="quorum")
    code, found = doctor(quorum, "--workers", "1", "--concurrency", "1", "--broker-nodes", "1")
    assert code == 1
    assert found["queues"]["severity"] == "problem"
    # Without the count, and no management API to ask: a warning that says how to tell it
    code, found = doctor(quorum, "--workers", "1", "--concurrency", "1")
    assert found["queues"]["severity"] == "warning"
    assert "--broker-nodes" in found["queues"]["change"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def pgbouncer(settings: Settings) -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test database: its URL."""
    executable = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(executable).exists():
        pytest.fail("pgbouncer is not installed (apt-get install pgbouncer)", pytrace=False)
    url = make_url(settings.database_url)
    port = _free_port()
    # A folder PgBouncer's own user can reach (pytest's are private to this one).
    scratch = tempfile.TemporaryDirectory(prefix="cw-pgbouncer-")
    folder = Path(scratch.name)
    folder.chmod(0o777)
    config = folder / "pgbouncer.ini"
    config.write_text(
        f"[databases]\n* = host={url.host} port={url.port or 5432} user={url.username}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\n"
        "ignore_startup_parameters = options,extra_float_digits\n"
        f"logfile = {folder}/pgbouncer.log\n")
    config.chmod(0o644)
    # PgBouncer refuses to run as root: it drops to nobody when started by root.
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([executable, *as_user, str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError("pgbouncer did not start") from None
                time.sleep(0.1)
        yield url.set(port=port).render_as_string(hide_password=False)
    finally:
        process.terminate()
        process.wait(timeout=10)
        scratch.cleanup()


def test_a_pooler_without_the_transaction_setting_fails(
        pgbouncer: str, settings_factory: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the workers' URL pointing at PgBouncer, and COUPONS_DB_POOLER not set
    monkeypatch.delenv("COUPONS_DB_POOLER", raising=False)
    pooled = settings_factory(database_url=pgbouncer)
    code, found = doctor(pooled, "--workers", "40", "--concurrency", "8")
    # Then the doctor sees a pooler (the server answers on another port) and asks for it
    assert code == 1
    assert found["pooler"]["severity"] == "problem"
    assert found["pooler"]["change"].startswith("set COUPONS_DB_POOLER=transaction")
    # and the fleet is bounded by the pooler, not by max_connections
    assert found["connections"]["severity"] == "ok"
    # When the setting says so, nothing is left to change
    monkeypatch.setenv("COUPONS_DB_POOLER", "transaction")
    code, found = doctor(settings_factory(database_url=pgbouncer), "--workers", "40",
                         "--concurrency", "8")
    assert found["pooler"]["severity"] == "ok", found["pooler"]
    assert code == 0
