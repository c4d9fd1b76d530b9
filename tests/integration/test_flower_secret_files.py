"""``coupon-worker flower`` reads FLOWER_BASIC_AUTH from the file FLOWER_BASIC_AUTH_FILE names."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from coupon_devtools.harness.processes import free_port, spawn
from tests.conftest import REPO_ROOT, coupon_worker_command, run_cli, settings_env, wait_until
from worker.config import Settings


def _status(url: str, auth: tuple[str, str] | None) -> int | None:
    try:
        return requests.get(url, auth=auth, timeout=5).status_code
    except requests.RequestException:
        return None


def test_flower_protects_itself_with_the_login_in_the_file(settings: Settings,
                                                           tmp_path: Path) -> None:
    # Given Flower's login as a file, and an address that is not loopback
    login_file = tmp_path / "flower-login"
    login_file.write_text("support:flower-file-login\n", encoding="utf-8")
    port = free_port()
    env = {**settings_env(settings), "FLOWER_BASIC_AUTH_FILE": str(login_file)}
    env.pop("FLOWER_BASIC_AUTH", None)
    process = spawn("flower", [coupon_worker_command(), "flower", "--port", str(port),
                               "--address", "0.0.0.0"], env, tmp_path, cwd=REPO_ROOT)  # noqa: S104
    try:
        # When it runs, it asks for that login: refused without it, served with it
        url = f"http://127.0.0.1:{port}/api/workers"
        wait_until(lambda: _status(url, None) == 401, timeout_s=30,
                   message="Flower to refuse an anonymous request")
        assert _status(url, ("support", "flower-file-login")) == 200
        assert _status(url, ("support", "wrong")) == 401
    finally:
        process.stop(grace_s=5)


def test_flower_refuses_both_the_login_and_its_file(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    login_file = tmp_path / "flower-login"
    login_file.write_text("a:b\n", encoding="utf-8")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "a:b")
    monkeypatch.setenv("FLOWER_BASIC_AUTH_FILE", str(login_file))
    result = run_cli(settings, "flower")
    assert result.exit_code == 2
    assert "FLOWER_BASIC_AUTH and FLOWER_BASIC_AUTH_FILE are both set" in result.output
