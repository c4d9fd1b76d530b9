"""The demo's subprocesses: migrate, the sandbox, the worker and Flower; started, checked and
stopped (also those an earlier ``--keep`` run left)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from coupon_devtools.demo.backends import Backends, Database, stop_embedded_postgres
from coupon_devtools.demo.defaults import (
    DEMO_ENVIRONMENT,
    MIGRATE_TIMEOUT_S,
    READY_TIMEOUT_S,
    STATE_FILE,
    STOP_GRACE_S,
    DemoError,
    display,
)
from coupon_devtools.harness.processes import (
    Spawned,
    cli_command,
    command_line,
    free_port,
    group_alive,
    stop_groups,
)
from coupon_devtools.harness.processes import spawn as spawn_process


@dataclass
class Service(Spawned):
    """One subprocess the demo started, in a session of its own, logging to a file."""

    url: str | None = None

    def check_running(self) -> None:
        """Raise :class:`DemoError`, with the log's tail, if the process has exited."""
        if not self.alive():
            raise DemoError(f"{self.name} exited with code {self.process.returncode}; "
                            f"its log ({display(self.log_path)}) ends with:\n{self.log_tail()}")


def _cli(env: Mapping[str, str]) -> list[str]:
    from coupon_devtools.filebroker import LAUNCHER_MODULE, uses_file_broker

    if uses_file_broker(env.get("COUPONS_BROKER_URL", "")):
        # The file broker's scheme exists only where it is registered: its launcher does so.
        return [sys.executable, "-m", LAUNCHER_MODULE]
    return cli_command()


def demo_env(backends: Backends, sandbox_url: str, metrics_port: int) -> dict[str, str]:
    """The explicit environment of every subprocess: the demo's choices, nothing inherited
    from the caller's coupon-worker or Capillary settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update(DEMO_ENVIRONMENT)
    env.update(backends.broker.env())
    env["COUPONS_DATABASE_URL"] = backends.database.url
    env["CAPILLARY_BASE_URL"] = sandbox_url
    env["COUPONS_METRICS_PORT"] = str(metrics_port)
    return env


def spawn(name: str, args: Sequence[str], env: Mapping[str, str], logs: Path,
          services: list[Service]) -> Service:
    """Start ``coupon-worker ARGS`` and add it to ``services`` (what cleanup stops)."""
    spawned = spawn_process(name, [*_cli(env), *args], env, logs)
    service = Service(spawned.name, spawned.process, spawned.log_path)
    services.append(service)
    return service


def wait_until(service: Service, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        service.check_running()
        if time.monotonic() > deadline:
            raise DemoError(f"{service.name} was not {what} after {READY_TIMEOUT_S:g} s; see "
                            f"{display(service.log_path)}:\n{service.log_tail()}")
        time.sleep(0.1)


def migrate(env: Mapping[str, str], logs: Path) -> None:
    """Run ``coupon-worker migrate`` with the demo's environment."""
    log_path = logs / "migrate.log"
    with log_path.open("wb") as log_file:
        done = subprocess.run([*_cli(env), "migrate"], env=dict(env), stdout=log_file,  # noqa: S603
                              stderr=subprocess.STDOUT, timeout=MIGRATE_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise DemoError(f"coupon-worker migrate failed; {display(log_path)} says:\n"
                        + log_path.read_text(errors="replace")[-3000:])


def start_sandbox(env: Mapping[str, str], logs: Path, services: list[Service],
                  *args: str) -> Service:
    """Start ``coupon-worker sandbox ARGS`` at ``CAPILLARY_BASE_URL`` and wait until it
    answers; over HTTPS the clients' ``REQUESTS_CA_BUNDLE`` is the CA file it writes."""
    from coupon_devtools.sandbox import SandboxAdmin

    ca_file = env.get("REQUESTS_CA_BUNDLE") if env["CAPILLARY_BASE_URL"].startswith(
        "https:") else None
    sandbox = spawn("sandbox", ["sandbox", *args], env, logs, services)
    sandbox.url = env["CAPILLARY_BASE_URL"]
    with SandboxAdmin(sandbox.url, timeout_s=1.0, ca_file=ca_file) as admin:
        def sandbox_ready() -> bool:
            if ca_file is not None and not Path(ca_file).exists():
                return False
            try:
                admin.wait_ready(timeout_s=0.5)
            except TimeoutError:
                return False
            return True

        wait_until(sandbox, sandbox_ready, "answering")
    return sandbox


@dataclass(frozen=True)
class ConsoleLogin:
    """Where this run's support console answers, and a login made for this run only."""

    url: str
    user: str
    password: str


def start_console(env: Mapping[str, str], logs: Path, services: list[Service], *,
                  flower_url: str | None) -> ConsoleLogin:
    """Start ``coupon-worker console`` with a fresh admin login and session secret."""
    from worker.entrypoints.console.auth import hash_password

    password = secrets.token_urlsafe(12)
    users = {"users": [{"name": "demo", "role": "admin",
                        "password_hash": hash_password(password)}]}
    port = free_port()
    console_env = {**env, "COUPONS_CONSOLE_SECRET": secrets.token_hex(32),
                   "COUPONS_CONSOLE_USERS": json.dumps(users)}
    if flower_url:
        console_env["COUPONS_CONSOLE_FLOWER_URL"] = flower_url
    service = spawn("console", ["console", "--port", str(port)], console_env, logs, services)
    service.url = f"http://127.0.0.1:{port}"
    wait_until(service, lambda: _http_ok(f"{service.url}/login"), "answering")
    return ConsoleLogin(service.url, "demo", password)


def start_processes(env: Mapping[str, str], scenario: Path, logs: Path, *, sandbox_port: int,
                    flower: bool, services: list[Service],
                    console: bool = False) -> ConsoleLogin | None:
    """Start the sandbox, the worker, Flower and the console (appended to ``services`` as they
    start, so a failure half-way still stops the ones already running) and wait until each is
    ready."""
    start_sandbox(env, logs, services, "--port", str(sandbox_port), "--scenario", str(scenario))
    args = ["worker", "-c", "4", "-n", "demo@%h"]
    # The worker logs " ready." at INFO; its log is a file, so the console stays quiet.
    worker = spawn("worker", args, {**env, "COUPONS_LOG_LEVEL": "INFO"}, logs, services)
    wait_until(worker, lambda: " ready." in worker.log_tail(100_000), "ready")
    if flower:
        # After the worker is up, so that Flower's first look at the workers finds one.
        port = free_port()
        browser = spawn("flower", ["flower", "--port", str(port)], env, logs, services)
        browser.url = f"http://127.0.0.1:{port}"
        wait_until(browser, lambda: _http_ok(f"{browser.url}/healthcheck"), "answering")
    if not console:
        return None
    flower_url = next((s.url for s in services if s.name == "flower"), None)
    return start_console(env, logs, services, flower_url=flower_url)


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1.0).status_code == 200
    except requests.RequestException:
        return False


def cleanup(services: Sequence[Service], database: Database | None, *, keep: bool) -> None:
    """Stop what the demo started (children first, then the embedded PostgreSQL)."""
    if keep:
        return
    stop_groups([s.pid for s in services], [s.process for s in services], grace_s=STOP_GRACE_S)
    if database is not None and database.pgdata is not None:
        stop_embedded_postgres(database.pgdata)


def save_state(workdir: Path, services: Sequence[Service], database: Database) -> Path:
    path = workdir / STATE_FILE
    path.write_text(json.dumps({
        "pids": [s.process.pid for s in services],
        "pgdata": str(database.pgdata) if database.pgdata else None,
    }) + "\n", encoding="utf-8")
    return path


def stop_kept(workdir: Path, console: Console) -> bool:
    """Stop what an earlier ``--keep`` run left running in ``workdir``; True if anything was."""
    path = workdir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # Only groups that still run our CLI: the pids may have been reused since.
    pids = [pid for pid in state.get("pids", [])
            if isinstance(pid, int) and group_alive(pid)
            and any(mark in command_line(pid)
                    for mark in ("coupon-worker", "worker.entrypoints.cli",
                                 "coupon_devtools.filebroker"))]
    stop_groups(pids, grace_s=STOP_GRACE_S)
    stopped = len(pids)
    if state.get("pgdata") and stop_embedded_postgres(Path(state["pgdata"])):
        stopped += 1
    path.unlink(missing_ok=True)
    if stopped:
        console.print(f"stopped {stopped} process(es) left running by an earlier --keep run "
                      f"in {display(workdir)}")
    return stopped > 0
