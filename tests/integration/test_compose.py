"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose 1.29) validates the file against the compose
schema and prints it normalized; the tests then check the wiring: services, start-up order,
health checks, that every container runs a real ``coupon-worker`` subcommand and that the
configuration goes through the project's environment variables only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.config import Settings
from worker.console.config import ConsoleSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SERVICES = {"postgres", "rabbitmq", "sandbox", "migrate", "worker", "flower", "console"}
# Command-line options allowed per service: where to listen. Everything else is configuration
# and must come from the environment.
ALLOWED_OPTIONS = {"sandbox": {"--host", "--port"}, "flower": {"--address", "--port"},
                   "console": {"--host", "--port"}}
# Environment variables the project reads that are not Settings fields.
EXTRA_PROJECT_VARS = {"COUPONS_ENV_FILE"}


def _settings_env_names() -> set[str]:
    names = set()
    for field in [*Settings.model_fields.values(), *ConsoleSettings.model_fields.values()]:
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
    return names


@cache
def compose_config() -> dict[str, Any]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed: install Debian's docker-compose "
                    "(apt-get install docker-compose; CI installs it) to validate "
                    "docker-compose.yml", pytrace=False)
    # Defaults only: ignore the caller's variables and any .env next to the compose file.
    interpolated = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text(encoding="utf-8")))
    env = {key: value for key, value in os.environ.items()
           if key not in interpolated and not key.startswith("COMPOSE_")}
    # The secrets without a default: an operator's own values (placeholders here).
    env.update({name: f"placeholder-{name.lower()}" for name in required_secrets()})
    with tempfile.TemporaryDirectory() as scratch:
        empty_env_file = Path(scratch) / "empty.env"
        empty_env_file.touch()
        result = subprocess.run(
            [executable, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def required_secrets() -> set[str]:
    """Variables the compose file requires (``${VAR:?…}``): no default is shipped."""
    return set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text(encoding="utf-8")))


def services() -> dict[str, dict[str, Any]]:
    found = compose_config()["services"]
    assert isinstance(found, dict)
    return found


def project_services() -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "a project service must say which coupon-worker subcommand it runs"
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


@cache
def cli_subcommands() -> frozenset[str]:
    cli = Path(sys.executable).parent / "coupon-worker"
    assert cli.exists(), f"{cli.name} is not installed next to {sys.executable}: pip install -e ."
    result = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    _, _, listing = result.stdout.partition("Commands:")
    return frozenset(match.group(1) for match in re.finditer(r"^  (\S+)", listing, re.M))


def test_compose_file_validates_and_has_all_services() -> None:
    assert COMPOSE_FILE.exists()
    assert set(services()) == SERVICES
    assert set(project_services()) == {"sandbox", "migrate", "worker", "flower", "console"}


def test_start_up_order() -> None:
    svcs = services()
    assert svcs["worker"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "rabbitmq": {"condition": "service_healthy"},
        "sandbox": {"condition": "service_healthy"},
    }
    assert svcs["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert svcs["migrate"]["restart"] == "no"
    assert svcs["flower"]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}


def test_dependencies_have_health_checks() -> None:
    svcs = services()
    for name in ("postgres", "rabbitmq", "sandbox"):
        check = svcs[name].get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
    assert "pg_isready" in " ".join(svcs["postgres"]["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in svcs["rabbitmq"]["healthcheck"]["test"]
    assert "/sandbox/health" in " ".join(svcs["sandbox"]["healthcheck"]["test"])


def test_worker_health_is_consumer_liveness() -> None:
    check = services()["worker"]["healthcheck"]
    assert not check.get("disable")
    test = check["test"]
    assert test[0] == "CMD", "exec form: no shell needed in the image"
    assert test[1:3] == ["coupon-worker", "health"], test
    assert test[2] in cli_subcommands()
    options = {word.split("=", 1)[0] for word in test[3:] if word.startswith("-")}
    assert options <= {"--max-age", "--json"}, "the worker's name and pid vary: judge them all"
    # Stale after 3 heartbeat intervals of the default 5 s; a probe must see that in time.
    assert _seconds(check["interval"]) <= 30 and _seconds(check["timeout"]) >= 5
    assert _seconds(check["start_period"]) >= 15, "time to connect before the first beat"
    env = project_services()["worker"]["environment"]
    assert "COUPONS_HEARTBEAT_DIR" not in env or env["COUPONS_HEARTBEAT_DIR"].startswith("/")


def _seconds(duration: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert found, duration
    return float(found.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[found.group(2)]


def test_worker_can_be_scaled() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker, "a fixed host port breaks --scale worker=3; use expose"
    assert "9808" in [str(port) for port in worker.get("expose", [])]


@pytest.mark.parametrize("name", ["sandbox", "migrate", "worker", "flower", "console"])
def test_project_services_run_real_subcommands(name: str) -> None:
    service = project_services()[name]
    words = command_words(service)
    assert words[0] == name
    assert words[0] in cli_subcommands(), (
        f"service {name!r} runs `coupon-worker {words[0]}`, which `coupon-worker --help` does "
        f"not list (it lists {sorted(cli_subcommands())})")


def test_configuration_only_through_environment() -> None:
    known = _settings_env_names() | EXTRA_PROJECT_VARS
    for name, service in services().items():
        assert "env_file" not in service, f"{name}: use environment, not env_file"
    for name, service in project_services().items():
        assert not service.get("volumes"), f"{name}: no configuration files are mounted"
        options = {word.split("=", 1)[0] for word in command_words(service)[1:]
                   if word.startswith("-")}
        extra = options - ALLOWED_OPTIONS.get(name, set())
        assert not extra, f"{name}: configure {sorted(extra)} through environment variables"
        env = service.get("environment") or {}
        assert isinstance(env, dict)
        for var in env:
            if var.startswith(("COUPONS_", "CAPILLARY_")):
                assert var in known, (
                    f"{name}: {var} is not a variable the project reads (worker/config.py)")


@pytest.mark.parametrize("name", ["migrate", "worker", "console"])
def test_environment_uses_project_names_and_compose_hosts(name: str) -> None:
    env = project_services()[name]["environment"]
    hosts = {
        "COUPONS_DATABASE_URL": "postgres",
        "COUPONS_BROKER_URL": "rabbitmq",
        "CAPILLARY_BASE_URL": "sandbox",
    }
    for var, host in hosts.items():
        assert var in env, f"{name} does not set {var}"
        assert urlsplit(env[var]).hostname == host, f"{name}: {var} should point at {host}"
    assert env["COUPONS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["COUPONS_DATABASE_URL"].endswith("/coupon_worker")
    assert env["COUPONS_ENV_FILE"] == "", "no dotenv file inside the containers"
    assert env["COUPONS_LOG_FORMAT"] == "json"
    assert env.get("CAPILLARY_USERNAME") and env.get("CAPILLARY_PASSWORD")


def test_secrets_can_be_overridden() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for var in ("POSTGRES_PASSWORD", "CAPILLARY_USERNAME", "CAPILLARY_PASSWORD"):
        assert f"${{{var}:-" in text, f"{var} should be ${{{var}:-default}} in the compose file"
    assert services()["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_nothing_published_ships_a_default_password() -> None:
    # Given what the host can reach: RabbitMQ, Flower, the console
    assert {"RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH", "COUPONS_CONSOLE_SECRET",
            "COUPONS_CONSOLE_USERS"} <= required_secrets()
    rabbit = services()["rabbitmq"]["environment"]
    assert rabbit["RABBITMQ_DEFAULT_USER"] != "guest"
    assert rabbit["RABBITMQ_DEFAULT_PASS"] == "placeholder-rabbitmq_password"
    assert services()["flower"]["environment"]["FLOWER_BASIC_AUTH"] == \
        "placeholder-flower_basic_auth"
    # and every published port listens on the host's loopback only
    for name, service in services().items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every interface"


def test_flower_does_not_receive_capillary_credentials() -> None:
    env = services()["flower"]["environment"]
    assert not [k for k in env if k.startswith("CAPILLARY_")], sorted(env)
    assert urlsplit(env["COUPONS_BROKER_URL"]).hostname == "rabbitmq"


def test_console_needs_its_secret_and_users() -> None:
    console = services()["console"]
    env = console["environment"]
    assert env["COUPONS_CONSOLE_SECRET"] == "placeholder-coupons_console_secret"
    assert env["COUPONS_CONSOLE_USERS"] == "placeholder-coupons_console_users"
    assert console["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_dockerfile() -> None:
    assert DOCKERFILE.exists()
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["coupon-worker"\]\s*$', text, re.M)
    assert re.search(r'^CMD \["worker"\]\s*$', text, re.M)
    # The image installs the wheel it built (which carries alembic.ini and the migrations for
    # `coupon-worker migrate`), never the source tree in editable mode.
    assert re.search(r"^RUN pip wheel .* \.$", text, re.M)
    assert "alembic.ini" in text
    assert "COPY migrations/" in text
    assert "pip install -e" not in text and "--editable" not in text
    assert "[dev]" not in text, "no dev extras in the image"
    # The compose file's sandbox service runs `coupon-worker sandbox` from this image.
    assert "COPY coupon_devtools/" in text
    assert re.search(r"pip install .*\.whl\)\[devtools\]", text), "the devtools extra"
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!.env" not in ignore
