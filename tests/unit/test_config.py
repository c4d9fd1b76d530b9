"""Settings: defaults for local services, clear refusals, secrets kept out of sight."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_settings
from worker.domain.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("COUPONS_", "CAPILLARY_")) and name != "COUPONS_ENV_FILE":
            monkeypatch.delenv(name)


def test_defaults_point_at_local_services() -> None:
    settings = load_settings()
    assert "127.0.0.1:5432" in settings.database_url
    assert "127.0.0.1:5672" in settings.broker_url
    assert settings.capillary_base_url == "http://127.0.0.1:8750"
    assert settings.auth_scheme is None
    with pytest.raises(ConfigurationError, match="no Capillary credentials"):
        settings.require_capillary_credentials()


def test_environment_names_are_the_public_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COUPONS_DATABASE_URL", "postgresql://u@db:5432/x")
    monkeypatch.setenv("COUPONS_BROKER_URL", "amqp://u:p@mq:5672//")
    monkeypatch.setenv("CAPILLARY_BASE_URL", "https://eu.api.capillarytech.com/")
    monkeypatch.setenv("CAPILLARY_OAUTH_KEY", "k")
    monkeypatch.setenv("CAPILLARY_OAUTH_SECRET", "s")
    monkeypatch.setenv("COUPONS_HTTP_TIMEOUT_SECONDS", "7.5")
    monkeypatch.setenv("COUPONS_EVENTS_QUEUE", "bus.events")
    settings = load_settings()
    assert settings.database_url == "postgresql+psycopg://u@db:5432/x"
    assert settings.capillary_base_url == "https://eu.api.capillarytech.com"
    assert settings.auth_scheme == "oauth"
    assert settings.http_timeout_s == 7.5
    assert settings.events_queue == "bus.events"


def test_plain_http_is_refused_unless_loopback_or_opted_in() -> None:
    with pytest.raises(ConfigurationError, match="plain http:// is refused"):
        load_settings(capillary_base_url="http://eu.api.capillarytech.com")
    assert load_settings(capillary_base_url="http://localhost:9000").capillary_base_url
    assert load_settings(capillary_base_url="http://[::1]:9000").capillary_base_url
    assert load_settings(capillary_base_url="http://sandbox:8750",
                         capillary_allow_insecure_http=True).capillary_base_url


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"capillary_username": "u"}, "needs both CAPILLARY_USERNAME and CAPILLARY_PASSWORD"),
        ({"capillary_username": "u", "capillary_password": "p", "capillary_oauth_key": "k",
          "capillary_oauth_secret": "s"}, "not both"),
        ({"retry_base_s": 10, "retry_max_s": 5}, "COUPONS_RETRY_MAX_SECONDS"),
        ({"lease_s": 10}, "COUPONS_LEASE_SECONDS must be at least"),
        ({"database_url": "mysql://x"}, "must be a PostgreSQL URL"),
        ({"max_attempts": 0}, "COUPONS_MAX_ATTEMPTS"),
        ({"db_lock_timeout_s": 20}, "COUPONS_DB_LOCK_TIMEOUT_SECONDS must not exceed"),
        ({"db_statement_timeout_s": 120}, "must be below the task hard time limit"),
        ({"db_keepalive_idle_s": 100}, "must be below the task hard time limit"),
        ({"db_connect_timeout_s": 1}, "COUPONS_DB_CONNECT_TIMEOUT_SECONDS"),
        ({"heartbeat_interval_s": 0}, "COUPONS_HEARTBEAT_INTERVAL_SECONDS"),
        ({"retention_days": 500}, "COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS and "
                                  "COUPONS_RETENTION_AUDIT_DAYS must be at least"),
        ({"retention_days": 90, "retention_audit_days": 60}, "COUPONS_RETENTION_AUDIT_DAYS"),
    ],
)
def test_invalid_settings_name_the_variable(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_settings(**overrides)


def test_secrets_are_hidden_everywhere_settings_are_printed() -> None:
    settings = load_settings(capillary_username="u", capillary_password="pa55word",
                             broker_url="amqp://guest:brokerpw@mq:5672//",
                             database_url="postgresql+psycopg://app:dbpw@db/x")
    shown = f"{settings!r} {settings} {settings.safe_summary()}"
    for secret in ("pa55word", "brokerpw", "dbpw"):
        assert secret not in shown


def test_database_limits_fit_inside_the_hard_time_limit() -> None:
    settings = load_settings()
    # The defaults: a statement gives up long before Celery would kill the task.
    assert settings.db_statement_timeout_s * 10 <= settings.task_hard_time_limit_s
    assert settings.db_stall_limit_s < settings.task_hard_time_limit_s
    # A short lease needs short database timeouts, and says so.
    with pytest.raises(ConfigurationError, match=r"= 30 s must be below .* = 25 s"):
        load_settings(lease_s=30, http_timeout_s=2, http_connect_timeout_s=1,
                      rate_limit_max_wait_s=5)
    short = load_settings(lease_s=30, http_timeout_s=2, http_connect_timeout_s=1,
                          rate_limit_max_wait_s=5, db_keepalive_idle_s=5,
                          db_keepalive_interval_s=2, db_keepalive_count=3)
    assert short.db_stall_limit_s == 5 + 11


def test_database_limits_become_libpq_parameters() -> None:
    from worker.adapters.postgres.unit_of_work import ConnectionLimits

    limits = ConnectionLimits.from_settings(load_settings(db_statement_timeout_s=2.5,
                                                          db_lock_timeout_s=0.75))
    assert limits.connect_args("coupon-worker") == {
        "application_name": "coupon-worker",
        "connect_timeout": 5,
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
        "keepalives_count": 3, "tcp_user_timeout": 25_000,
        "options": "-c statement_timeout=2500 -c lock_timeout=750",
    }
    # Tools that run long statements (migrations, support queries) keep the server's limits.
    assert "options" not in ConnectionLimits().connect_args("coupon-worker")


def test_behind_a_transaction_pooler_the_limits_are_set_per_transaction() -> None:
    from worker.adapters.postgres.unit_of_work import ConnectionLimits

    # Given the default, a direct connection
    assert load_settings().db_pooler == "none"
    # When a pooler in transaction mode is named
    limits = ConnectionLimits.from_settings(load_settings(
        db_pooler="transaction", db_statement_timeout_s=2.5, db_lock_timeout_s=0.75))
    args = limits.connect_args("coupon-worker")
    # Then nothing goes in the startup packet that PgBouncer refuses, nothing is prepared,
    # and the timeouts are set for one transaction at a time
    assert "options" not in args and args["prepare_threshold"] is None
    assert args["keepalives"] == 1 and args["tcp_user_timeout"] == 25_000
    assert limits.transaction_settings_sql() == (
        "SELECT set_config('statement_timeout', '2500', true), "
        "set_config('lock_timeout', '750', true)")
    assert ConnectionLimits(pooler="transaction").transaction_settings_sql() == ""
    with pytest.raises(ConfigurationError, match="COUPONS_DB_POOLER"):
        load_settings(db_pooler="session")


def test_prepared_statements_follow_the_pooler_unless_set() -> None:
    from worker.adapters.postgres.unit_of_work import ConnectionLimits

    def limits(**values: object) -> ConnectionLimits:
        return ConnectionLimits.from_settings(load_settings(**values))

    # auto: prepared on a direct connection, not behind a pooler in transaction mode
    assert limits().statement_mode().prepare is True
    assert "prepare_threshold" not in limits().connect_args("w")
    assert limits(db_pooler="transaction").statement_mode().prepare is False
    # on, behind a pooler that keeps them per client: psycopg's own preparing stays on too,
    # and the limits are still set per transaction
    kept = limits(db_pooler="transaction", db_prepared_statements="on")
    assert kept.statement_mode().prepare is True
    assert kept.statement_mode().per_transaction
    assert "prepare_threshold" not in kept.connect_args("w")
    assert "options" not in kept.connect_args("w")
    # off on a direct connection: nothing prepared, the limits still in the startup packet
    direct_off = limits(db_prepared_statements="off")
    assert direct_off.statement_mode().prepare is False
    assert direct_off.statement_mode().per_transaction is None
    assert direct_off.connect_args("w")["prepare_threshold"] is None
    assert "statement_timeout" in str(direct_off.connect_args("w")["options"])


def test_the_console_reads_the_same_dotenv_file_as_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.entrypoints.console.config import load_console_settings

    for name in ("COUPONS_CONSOLE_SECRET", "COUPONS_CONSOLE_USERS", "COUPONS_CONSOLE_TIMEZONE"):
        monkeypatch.delenv(name, raising=False)
    dotenv = tmp_path / "console.env"
    dotenv.write_text("COUPONS_CONSOLE_SECRET=dotenv-secret-0123456789abcdefghijklmn\n"
                      "COUPONS_CONSOLE_TIMEZONE=Asia/Kolkata\n")
    monkeypatch.setenv("COUPONS_ENV_FILE", str(dotenv))
    console = load_console_settings()
    assert console.secret.get_secret_value() == "dotenv-secret-0123456789abcdefghijklmn"
    assert console.timezone == "Asia/Kolkata"
