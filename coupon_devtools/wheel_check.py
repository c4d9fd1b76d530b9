"""CI's proof that the distribution works as shipped (``.ci/wheel-check``, ``make wheel-check``).

1. Build the sdist, and the wheel from that sdist (``python -m build``): neither prints a
   packaging warning.
2. Install the wheel into a fresh virtual environment in a temporary folder, outside the
   checkout; the install prints no packaging warning either.
3. From that folder: ``coupon-worker --version``, ``coupon-worker migrate`` on a new database.
4. Start that environment's worker against the sandbox (run from this checkout's dev tools) on
   a RabbitMQ vhost of its own, publish one event, and check the ledger (and the sandbox, the
   ground truth) hold exactly one coupon; check its start-up log and build-info metric.
5. ``migrate`` again: a no-op. ``alembic upgrade head`` from the checkout: a no-op too.

Everything it creates (folder, database, vhost) is removed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost
from coupon_devtools.sandbox import BackgroundSandbox, SandboxAdmin
from worker import __version__
from worker.adapters.rabbitmq.publisher import EventProducer
from worker.config import load_settings
from worker.health import check_health

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("COUPONS_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
RABBIT_HOST = os.environ.get("COUPONS_TEST_RABBIT_HOST", "127.0.0.1:5672")
SANDBOX_USER, SANDBOX_PASSWORD = "store.server", "server123"
# What a packaging problem prints: setuptools' and pip's deprecations and warnings. A pip
# configuration that names a local index folder which does not exist warns about that folder
# on every install; that is the machine's configuration, not the package.
WARNING = re.compile(r"(?i)warning|deprecat")
# A file the build copies or adds is named, not a warning ("0008_coupon_warnings.py").
NOT_OURS = re.compile(r"Location '.*' is ignored|^\s*(copying|adding|creating) ")
# `migrate` says "[created and ]migrated <database> to revision <rev>", maybe wrapped.
MIGRATED = re.compile(r"migrated\s+\S+\s+to\s+revision\s+(\w+)")


def step(message: str) -> None:
    print(f"wheel-check: {message}", flush=True)


def run(argv: Sequence[str | Path], *, cwd: Path, env: dict[str, str] | None = None,
        timeout_s: float = 300) -> str:
    """Run a command, fail with its output if it fails; its stdout and stderr together."""
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,  # noqa: S603 - our argv
                            text=True, timeout=timeout_s, check=False)
    output = result.stdout + result.stderr
    if result.returncode:
        raise SystemExit(f"wheel-check: {' '.join(map(str, argv))} failed "
                         f"({result.returncode}):\n{output}")
    return output


def no_warnings(what: str, output: str) -> None:
    found = [line for line in output.splitlines()
             if WARNING.search(line) and not NOT_OURS.search(line)]
    if found:
        raise SystemExit(f"wheel-check: {what} printed warnings:\n" + "\n".join(found))


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise SystemExit(f"wheel-check: timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def own_resources(tag: str) -> Iterator[tuple[str, str]]:
    """A database URL (not created yet: migrate creates it) and a vhost's broker URL."""
    name = f"cw_wheel_{tag}"
    vhost = f"cw-wheel-{tag}"
    create_vhost(vhost)
    try:
        yield str(make_url(PG_URL).set(database=name).render_as_string(hide_password=False)), \
            f"amqp://guest:guest@{RABBIT_HOST}/{vhost}"
    finally:
        drop_database(PG_URL, name)
        delete_vhost(vhost)


def build(dist: Path) -> tuple[Path, Path]:
    step("building the sdist, then the wheel from it")
    # Byte-compiling off (PYTHONDONTWRITEBYTECODE) makes setuptools warn that it skips it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    output = run([sys.executable, "-m", "build", "--outdir", dist, REPO_ROOT], cwd=REPO_ROOT,
                 env=env)
    no_warnings("the build", output)
    (sdist,), (wheel,) = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    return sdist, wheel


def install(wheel: Path, venv: Path) -> Path:
    step(f"installing {wheel.name} into a fresh environment outside the checkout")
    run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    output = run([venv / "bin" / "pip", "install", "--disable-pip-version-check", wheel],
                 cwd=venv.parent, timeout_s=600)
    no_warnings("installing the wheel", output)
    return venv / "bin" / "coupon-worker"


def worker_env(values: dict[str, Any]) -> dict[str, str]:
    settings = load_settings(**values)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COUPONS_", "CAPILLARY_", "PYTHON", "VIRTUAL_ENV"))}
    for name, field in type(settings).model_fields.items():
        alias, value = field.validation_alias, getattr(settings, name)
        if not isinstance(alias, str) or value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[alias] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    env["COUPONS_ENV_FILE"] = ""
    return env


def check(workdir: Path) -> None:
    started = time.monotonic()
    _sdist, wheel = build(workdir / "dist")
    cli = install(wheel, workdir / "venv")
    outside = workdir / "elsewhere"
    outside.mkdir()
    version = run([cli, "--version"], cwd=outside)
    if __version__ not in version:
        raise SystemExit(f"wheel-check: --version said {version!r}, not {__version__}")
    tag = uuid.uuid4().hex[:8]
    with own_resources(tag) as (database_url, broker_url), BackgroundSandbox() as sandbox:
        metrics_port = free_port()
        env = worker_env({
            "database_url": database_url, "broker_url": broker_url,
            "capillary_base_url": sandbox.url, "capillary_username": SANDBOX_USER,
            "capillary_password": SANDBOX_PASSWORD, "metrics_port": metrics_port,
            "heartbeat_dir": str(workdir / "heartbeats"), "heartbeat_interval_s": 0.5,
        })
        step("migrating a new database with the installed command")
        first = run([cli, "migrate"], cwd=outside, env=env)
        if "created and migrated" not in first:
            raise SystemExit(f"wheel-check: migrate did not create the database:\n{first}")
        migrated = MIGRATED.search(first)
        if migrated is None:
            raise SystemExit(f"wheel-check: migrate said no revision:\n{first}")
        revision = migrated.group(1)
        step(f"running one event through the installed worker (schema {revision})")
        worker_log = workdir / "worker.log"
        with worker_log.open("wb") as log_file:
            worker = subprocess.Popen(  # noqa: S603 - our argv
                [str(cli), "worker", "-c", "1", "-n", f"wheel-{tag}@%h"], cwd=outside, env=env,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run_one_event(env, database_url, sandbox.url, workdir, worker, worker_log,
                          metrics_port, revision)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        step("migrating again: a no-op")
        again = run([cli, "migrate"], cwd=outside, env=env)
        again_to = MIGRATED.search(again)
        if "created" in again or "Running upgrade" in again or again_to is None \
                or again_to.group(1) != revision:
            raise SystemExit(f"wheel-check: a second migrate was not a no-op:\n{again}")
        step("alembic upgrade head from the checkout: a no-op")
        run([Path(sys.executable).parent / "alembic", "upgrade", "head"], cwd=REPO_ROOT,
            env=env)
    step(f"passed in {time.monotonic() - started:.0f} s")


def run_one_event(env: dict[str, str], database_url: str, sandbox_url: str, workdir: Path,
                  worker: subprocess.Popen[bytes], worker_log: Path, metrics_port: int,
                  revision: str) -> None:
    def consuming() -> bool:
        if worker.poll() is not None:
            raise SystemExit(f"wheel-check: the worker exited ({worker.returncode}):\n"
                             f"{worker_log.read_text(errors='replace')}")
        return check_health(workdir / "heartbeats", pid=worker.pid).healthy

    wait_until(consuming, "the installed worker to consume", timeout_s=90)
    settings = load_settings(database_url=database_url, broker_url=env["COUPONS_BROKER_URL"],
                             capillary_base_url=sandbox_url)
    event = {"eventId": "wheel-check-1", "eventType": "TierUpgraded",
             "occurredAt": "2026-11-25T10:00:00Z", "customer": {"id": "566881933"},
             "seriesIds": [544770], "metadata": {"sourceType": "Journeys"}}
    with EventProducer.open(settings) as producer:
        producer.publish_raw(json.dumps(event).encode())
    engine = create_engine(database_url)
    try:
        def completed() -> bool:
            with engine.connect() as conn:
                state = conn.execute(text("SELECT state FROM events WHERE event_id = :e"),
                                     {"e": event["eventId"]}).scalar()
            return state == "completed"

        wait_until(completed, "the event to complete")
        with engine.connect() as conn:
            coupons = conn.execute(text("SELECT count(*) FROM coupons")).scalar_one()
    finally:
        engine.dispose()
    with SandboxAdmin(sandbox_url) as admin:
        issued = len(admin.ledger())
    if (coupons, issued) != (1, 1):
        raise SystemExit(f"wheel-check: {coupons} coupon(s) in the ledger, {issued} issued")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        metrics = response.read().decode()
    expected = f'schema="{revision}",version="{__version__}"'
    if not any(line.startswith("coupon_worker_build_info") and expected in line
               for line in metrics.splitlines()):
        raise SystemExit(f"wheel-check: no coupon_worker_build_info with {expected}")
    log = worker_log.read_text(errors="replace")
    if "worker.starting" not in log or __version__ not in log:
        raise SystemExit(f"wheel-check: the start-up log does not say the version:\n{log}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="coupon-wheel-check-") as scratch:
        check(Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
