"""The generated reference pages say what the code says: every setting is described and on the
configuration page, every command on the command-line page, and neither page names anything
that no longer exists. Each failure names the command that regenerates the pages."""

from __future__ import annotations

import re

import click
from pydantic import Field

from coupon_devtools.docs import PAGES, REGENERATE, ROOT, stale_pages, write_pages
from coupon_devtools.docs.cli import command_paths, render_cli
from coupon_devtools.docs.configuration import render_configuration, undocumented, variables
from worker.config import Settings
from worker.entrypoints.cli import main
from worker.entrypoints.console.config import ConsoleSettings

CONFIGURATION = ROOT / "docs" / "reference" / "configuration.md"
CLI = ROOT / "docs" / "reference" / "cli.md"


def documented_variables(page: str) -> set[str]:
    return set(re.findall(r"^### `([A-Z0-9_]+)`$", page, flags=re.MULTILINE))


def documented_commands(page: str) -> set[str]:
    return set(re.findall(r"^## `(coupon-worker[a-z -]*)`$", page, flags=re.MULTILINE))


def test_every_setting_has_a_description() -> None:
    missing = undocumented(Settings) + undocumented(ConsoleSettings)
    assert missing == [], (
        f"settings without a description: {missing}; add description= to their Field "
        f"(worker/config_fields.py, worker/entrypoints/console/config.py), then run "
        f"`{REGENERATE}`")


def test_the_configuration_page_lists_exactly_the_settings() -> None:
    # Given the page as committed and the settings as the code has them
    expected = set(variables(Settings)) | set(variables(ConsoleSettings))
    documented = documented_variables(CONFIGURATION.read_text(encoding="utf-8"))

    # Then neither has a variable the other lacks
    assert sorted(expected - documented) == [], (
        f"settings missing from {CONFIGURATION.name}: {sorted(expected - documented)}; "
        f"run `{REGENERATE}`")
    assert sorted(documented - expected) == [], (
        f"{CONFIGURATION.name} documents settings that do not exist: "
        f"{sorted(documented - expected)}; run `{REGENERATE}`")


def test_the_command_line_page_lists_exactly_the_commands() -> None:
    expected = set(command_paths())
    documented = documented_commands(CLI.read_text(encoding="utf-8"))
    assert sorted(expected - documented) == [], (
        f"commands missing from {CLI.name}: {sorted(expected - documented)}; "
        f"run `{REGENERATE}`")
    assert sorted(documented - expected) == [], (
        f"{CLI.name} documents commands that do not exist: {sorted(documented - expected)}; "
        f"run `{REGENERATE}`")


def test_no_generated_page_is_stale() -> None:
    stale = stale_pages()
    assert stale == [], f"stale generated pages: {stale}; run `{REGENERATE}`"


def test_a_new_setting_shows_up_and_an_undescribed_one_is_caught() -> None:
    # Given a settings class with one more field, described, and one without a description
    class Grown(Settings):
        new_knob_s: float = Field(1.5, gt=0, validation_alias="COUPONS_NEW_KNOB_SECONDS",
                                  description="A knob added after the page was written.")
        bare: int = Field(3, validation_alias="COUPONS_BARE")

    # When the page is rendered for it
    page = render_configuration(worker=Grown)

    # Then the new variable is there with its description, type, constraint and default, the
    # committed page no longer matches, and the field without a description is named
    assert "### `COUPONS_NEW_KNOB_SECONDS`" in page
    assert "A knob added after the page was written." in page
    assert "*number, above 0*; default: `1.5`" in page
    assert page != CONFIGURATION.read_text(encoding="utf-8")
    assert undocumented(Grown) == ["COUPONS_BARE"]


def test_a_new_command_shows_up_on_the_command_line_page() -> None:
    @main.command("zz-docs-probe", help="A command added after the page was written.")
    @click.option("--knob", type=int, default=3, show_default=True, help="How much.")
    def probe(knob: int) -> None:
        """Unused: the test only renders its help."""

    try:
        page = render_cli()
    finally:
        main.commands.pop("zz-docs-probe")

    assert "## `coupon-worker zz-docs-probe`" in page
    assert "- `--knob INTEGER`: How much.  [default: 3]" in page
    assert "[`coupon-worker zz-docs-probe`](#coupon-worker-zz-docs-probe)" in page
    assert page != CLI.read_text(encoding="utf-8")


def test_writing_the_pages_makes_them_current(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a checkout whose generated pages are missing
    # When the generator writes them
    written = write_pages(tmp_path)

    # Then it wrote every page, and they are current there
    assert sorted(written) == sorted(PAGES)
    assert stale_pages(tmp_path) == []
    assert write_pages(tmp_path) == []


def test_a_docs_page_named_in_the_code_becomes_a_link_the_site_checks() -> None:
    # Given a description that names a page of docs/ (as COUPONS_DB_POOLER's does)
    # When the page is rendered
    page = render_configuration()

    # Then it links there from docs/reference/, so the strict build fails if the page is gone
    assert "([docs/pooler.md](../pooler.md))" in page
    assert "[docs/security.md](../security.md)" in render_cli()


def test_the_check_command_passes_on_a_current_checkout_and_refuses_other_arguments(
        capsys) -> None:  # type: ignore[no-untyped-def]
    from coupon_devtools.docs.__main__ import main as docs_main

    assert docs_main(["docs", "--check"]) == 0
    assert docs_main(["docs", "--bogus"]) == 2
    assert "usage: python -m coupon_devtools.docs [--check]" in capsys.readouterr().err
