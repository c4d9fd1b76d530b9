"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose 1.29) validates the file against the compose
schema and prints it normalized; the tests then check the wiring: services, start-up order,
health checks, that every container runs a real ``coupon-worker`` subcommand, that the
configuration goes through the project's environment variables only, and least privilege: a
database role and a broker user per component, Capillary's credentials in the worker only, no
default secret in production (the sandbox's throwaway values live in ``deploy/sandbox.env``).
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
from worker.entrypoints.console.config import ConsoleSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SANDBOX_ENV = REPO_ROOT / "deploy" / "sandbox.env"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SERVICES = {"postgres", "rabbitmq", "sandbox", "db-roles", "migrate", "broker-users", "worker",
            "flower", "console", "prometheus", "alertmanager", "grafana"}
MONITORING = {"prometheus", "alertmanager", "grafana"}
# The coupon-worker subcommand each project service runs.
SUBCOMMANDS = {"sandbox": ["sandbox"], "db-roles": ["db", "roles"], "migrate": ["migrate"],
               "worker": ["worker"], "flower": ["flower"], "console": ["console"]}
# Command-line options allowed per service: where to listen, whether to apply. Everything else
# is configuration and must come from the environment.
ALLOWED_OPTIONS = {"sandbox": {"--host", "--port"}, "flower": {"--address", "--port"},
                   "console": {"--host", "--port"}, "db-roles": {"--apply"}}
# Environment variables the project reads that are not Settings fields.
EXTRA_PROJECT_VARS = {"COUPONS_ENV_FILE", *(f"COUPONS_DB_{job}_PASSWORD" for job in (
    "OWNER", "WORKER", "CONSOLE", "RETENTION"))}
# Who each component is, to PostgreSQL and to RabbitMQ.
DATABASE_USERS = {"db-roles": "postgres", "migrate": "coupon_owner", "worker": "coupon_worker",
                  "console": "coupon_console"}
BROKER_USERS = {"worker": "coupons-worker", "flower": "coupons-flower",
                "console": "coupons-console"}


def _settings_env_names() -> set[str]:
    names = set()
    for field in [*Settings.model_fields.values(), *ConsoleSettings.model_fields.values()]:
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
    return names


@cache
def compose_config(profile: str = "production") -> dict[str, Any]:
    """The normalized file: ``production`` with an operator's own secrets (placeholders here),
    ``sandbox`` with ``deploy/sandbox.env``'s throwaway values."""
    result = run_compose_config(profile)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def run_compose_config(profile: str, *, placeholders: bool = True,
                       ) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed: install Debian's docker-compose "
                    "(apt-get install docker-compose; CI installs it) to validate "
                    "docker-compose.yml", pytrace=False)
    # Only what is given here: ignore the caller's variables and any .env next to the file.
    interpolated = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text(encoding="utf-8")))
    env = {key: value for key, value in os.environ.items()
           if key not in interpolated and not key.startswith("COMPOSE_")}
    if profile == "production" and placeholders:
        # The secrets without a default: an operator's own values (placeholders here).
        env.update({name: f"placeholder-{name.lower()}" for name in required_secrets()})
    with tempfile.TemporaryDirectory() as scratch:
        env_file = SANDBOX_ENV
        if profile != "sandbox":
            env_file = Path(scratch) / "empty.env"
            env_file.touch()
        return subprocess.run(
            [executable, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )


def required_secrets() -> set[str]:
    """Variables the compose file requires (``${VAR:?…}``): no default is shipped."""
    return set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text(encoding="utf-8")))


def services(profile: str = "production") -> dict[str, dict[str, Any]]:
    found = compose_config(profile)["services"]
    assert isinstance(found, dict)
    return found


def project_services(profile: str = "production") -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile."""
    return {name: svc for name, svc in services(profile).items() if "build" in svc}


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
    assert set(project_services()) == set(SUBCOMMANDS)


def test_start_up_order() -> None:
    svcs = services()
    done = {"condition": "service_completed_successfully"}
    assert svcs["worker"]["depends_on"] == {
        "migrate": done, "broker-users": done, "rabbitmq": {"condition": "service_healthy"},
    }
    assert svcs["db-roles"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert svcs["migrate"]["depends_on"] == {"db-roles": done}
    assert svcs["broker-users"]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    for one_shot in ("db-roles", "migrate", "broker-users"):
        assert svcs[one_shot]["restart"] == "no"
    assert svcs["console"]["depends_on"]["broker-users"] == done
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


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_project_services_run_real_subcommands(name: str) -> None:
    service = project_services()[name]
    words = command_words(service)
    assert words[:len(SUBCOMMANDS[name])] == SUBCOMMANDS[name]
    assert words[0] in cli_subcommands(), (
        f"service {name!r} runs `coupon-worker {words[0]}`, which `coupon-worker --help` does "
        f"not list (it lists {sorted(cli_subcommands())})")


def test_configuration_only_through_environment() -> None:
    known = _settings_env_names() | EXTRA_PROJECT_VARS
    for name, service in services().items():
        assert "env_file" not in service, f"{name}: use environment, not env_file"
    for name, service in project_services().items():
        assert not service.get("volumes"), f"{name}: no configuration files are mounted"
        options = {word.split("=", 1)[0]
                   for word in command_words(service)[len(SUBCOMMANDS[name]):]
                   if word.startswith("-")}
        extra = options - ALLOWED_OPTIONS.get(name, set())
        assert not extra, f"{name}: configure {sorted(extra)} through environment variables"
        env = service.get("environment") or {}
        assert isinstance(env, dict)
        for var in env:
            if var.startswith(("COUPONS_", "CAPILLARY_")):
                assert var in known, (
                    f"{name}: {var} is not a variable the project reads (worker/config.py)")


@pytest.mark.parametrize("name", ["db-roles", "migrate", "worker", "flower", "console"])
def test_environment_uses_project_names_and_compose_hosts(name: str) -> None:
    env = project_services("sandbox")[name]["environment"]
    hosts = {"COUPONS_DATABASE_URL": "postgres", "COUPONS_BROKER_URL": "rabbitmq",
             "CAPILLARY_BASE_URL": "sandbox"}
    for var, host in hosts.items():
        if var in env:
            assert urlsplit(env[var]).hostname == host, f"{name}: {var} should point at {host}"
    if "COUPONS_DATABASE_URL" in env:
        assert env["COUPONS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["COUPONS_DATABASE_URL"].endswith("/coupon_worker")
    assert env["COUPONS_ENV_FILE"] == "", "no dotenv file inside the containers"
    assert env["COUPONS_LOG_FORMAT"] == "json"


def test_each_component_has_its_own_database_role() -> None:
    for name, service in project_services().items():
        url = service["environment"].get("COUPONS_DATABASE_URL") \
            if service.get("environment") else None
        if name not in DATABASE_USERS:
            assert url is None, f"{name} needs no database"
            continue
        parts = urlsplit(url)
        assert parts.username == DATABASE_USERS[name], name
        assert parts.password and parts.password.startswith("placeholder-"), (
            f"{name}: the database password must be an operator's required variable")
    # The roles' passwords go to the step that makes the roles, and nowhere else
    roles_env = services()["db-roles"]["environment"]
    for job in ("OWNER", "WORKER", "CONSOLE"):
        assert roles_env[f"COUPONS_DB_{job}_PASSWORD"].startswith("placeholder-"), job
    for name in ("worker", "console", "flower"):
        assert not [k for k in services()[name]["environment"] if k.startswith("COUPONS_DB_")]


def test_each_component_has_its_own_broker_user() -> None:
    for name, service in project_services().items():
        url = service["environment"].get("COUPONS_BROKER_URL") \
            if service.get("environment") else None
        if name not in BROKER_USERS:
            assert url is None, f"{name} needs no broker"
            continue
        parts = urlsplit(url)
        assert parts.username == BROKER_USERS[name], name
        assert parts.password and parts.password.startswith("placeholder-"), name
    # the administrator is no component's user
    admin = services()["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    assert admin not in BROKER_USERS.values() and admin != "guest"


def test_broker_users_are_made_with_the_commands_the_cli_prints() -> None:
    # Given the one-shot step that makes the users on the node
    step = services()["broker-users"]
    assert step["image"] == services()["rabbitmq"]["image"]
    assert step["entrypoint"] == ["sh", "-c"]
    script = step["command"][0].replace("$$", "$")
    # Then its lines are exactly what `coupon-worker broker users` prints for that node
    cli = Path(sys.executable).parent / "coupon-worker"
    printed = subprocess.run(
        [str(cli), "broker", "users", "--rabbitmqctl", "rabbitmqctl -n rabbit@rabbitmq"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("COUPONS_")},
             "COUPONS_ENV_FILE": ""})
    assert printed.returncode == 0, printed.stderr
    assert script.strip() == printed.stdout.strip()
    assert services()["rabbitmq"]["hostname"] == "rabbitmq"
    env = step["environment"]
    for component in ("WORKER", "PRODUCER", "FLOWER", "CONSOLE"):
        assert env[f"RABBITMQ_{component}_PASSWORD"].startswith("placeholder-"), component


def test_only_the_worker_holds_capillary_credentials() -> None:
    for name, service in services().items():
        env = service.get("environment") or {}
        held = sorted(k for k in env if k.startswith("CAPILLARY_"))
        if name == "worker":
            assert {"CAPILLARY_BASE_URL", "CAPILLARY_USERNAME", "CAPILLARY_PASSWORD"} <= set(held)
        else:
            assert not held, f"{name} holds {held}: only the worker calls Capillary"


def test_production_ships_no_default_secret_nor_plain_http() -> None:
    # Given the compose file with nothing set: it refuses to start, naming what is missing
    bare = run_compose_config("production", placeholders=False)
    assert bare.returncode != 0
    assert "set " in bare.stderr
    # and nothing secret, nor Capillary's address, has a default to fall back on
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    secretive = [name for name in defaults
                 if re.search(r"PASSWORD|SECRET|USERS|AUTH|CAPILLARY_(BASE_URL|USERNAME)", name)]
    assert not secretive, f"defaults for {secretive}"
    assert defaults["CAPILLARY_ALLOW_INSECURE_HTTP"] == "false"
    # and the worker refuses a plain-http API there
    env = dict(services()["worker"]["environment"])
    with pytest.raises(ValueError, match="plain http:// is refused"):
        Settings(**{**env, "CAPILLARY_BASE_URL": "http://eu.api.capillarytech.com"})
    assert Settings(**{**env, "CAPILLARY_BASE_URL": "https://eu.api.capillarytech.com"})


def test_the_sandbox_profile_runs_on_labelled_throwaway_values() -> None:
    # Given deploy/sandbox.env: every secret the file requires, throwaway and saying so
    lines = SANDBOX_ENV.read_text(encoding="utf-8").splitlines()
    assert "THROWAWAY" in "\n".join(line for line in lines if line.startswith("#"))
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert required_secrets() <= set(values)
    for name, value in values.items():
        if "PASSWORD" in name and not name.startswith("CAPILLARY_"):
            assert value.startswith("throwaway-"), name
    # Then the sandbox runs, and the worker calls it over plain http on purpose
    assert values["COMPOSE_PROFILES"] == "sandbox"
    sandbox = services("sandbox")
    assert sandbox["sandbox"]["profiles"] == ["sandbox"]
    env = sandbox["worker"]["environment"]
    assert env["CAPILLARY_BASE_URL"] == "http://sandbox:8750"
    assert Settings(**env).capillary_allow_insecure_http is True
    assert services("production")["sandbox"]["profiles"] == ["sandbox"], (
        "the sandbox starts only with its profile")


def test_nothing_published_ships_a_default_password() -> None:
    # Given what the host can reach: the two administrators, Flower, the console
    assert {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH",
            "COUPONS_CONSOLE_SECRET",
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
    assert re.search(r"pip install .*\.whl\)\[devtools,tracing\]", text), \
        "the devtools and tracing extras"
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!.env" not in ignore


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts of this repository's files: container path -> host path."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume.get("type") == "bind":
            found[volume["target"]] = Path(volume["source"])
        elif isinstance(volume, str) and volume.startswith(("/", ".")):
            source, target = volume.split(":")[:2]
            found[target] = Path(source)
    return found


def test_monitoring_runs_only_with_its_profile_and_mounts_the_shipped_files() -> None:
    svcs = services()
    for name in MONITORING:
        assert svcs[name]["profiles"] == ["monitoring"], name
        assert "build" not in svcs[name], f"{name} runs its upstream image"
    # Prometheus loads the shipped configuration and rules, as the tests check them
    prometheus = _mounts(svcs["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == \
        REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"] == \
        REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in svcs["prometheus"]["command"]
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"], "beside the configuration, as mounted"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "coupon-worker", "the job CouponNoWorkerAlive looks for"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["port"] == 9808
    # and sends what fires to the Alertmanager beside it, which routes with the shipped file
    (managers,) = config["alerting"]["alertmanagers"]
    assert managers["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    alertmanager = _mounts(svcs["alertmanager"])
    assert alertmanager["/etc/alertmanager/alertmanager.yml"] == \
        REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in svcs["alertmanager"]["command"]
    assert services()["worker"]["environment"]["COUPONS_METRICS_PORT"] == "9808"
    # Grafana is provisioned with the datasource and the dashboard
    grafana = _mounts(svcs["grafana"])
    assert grafana["/etc/grafana/provisioning"] == REPO_ROOT / "deploy" / "grafana" / "provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == REPO_ROOT / "deploy" / "grafana" / "dashboards"
    for source in (*prometheus.values(), *alertmanager.values(), *grafana.values()):
        assert source.exists(), source
    assert svcs["grafana"]["depends_on"] == {"prometheus": {"condition": "service_started"}}
    # No admin account, so no default password: anonymous viewers only
    env = svcs["grafana"]["environment"]
    assert env["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert not [k for k in env if "PASSWORD" in k]
