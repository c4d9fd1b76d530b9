"""The command line and the dev tools: found when installed, explained when not."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from worker.entrypoints.cli import root as cli


def _without_devtools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``coupon_devtools`` unimportable, as without the devtools extra."""
    for name in [n for n in sys.modules if n.startswith("coupon_devtools.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "coupon_devtools", None)


@pytest.mark.parametrize("command", sorted(cli.DEVTOOL_COMMANDS))
def test_a_dev_tool_command_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, command: str,
) -> None:
    # Given the dev tools are not installed
    _without_devtools(monkeypatch)
    # When the command is run, with the options it would take
    result = CliRunner().invoke(cli.main, [command, "--port", "1"])
    # Then it fails with the one thing to do about it
    assert result.exit_code == 1, result.output
    assert "install coupon-worker[devtools]" in result.output


def test_the_help_lists_the_dev_tool_commands_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the dev tools are not installed, the help still names their commands
    _without_devtools(monkeypatch)
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in cli.DEVTOOL_COMMANDS:
        assert command in result.output


def test_a_dev_tool_command_is_found_when_installed() -> None:
    # Given the dev tools are installed (make install), the command is the tool's own
    result = CliRunner().invoke(cli.main, ["sandbox", "--help"])
    assert result.exit_code == 0, result.output
    assert "--scenario" in result.output
