"""``coupon-worker sandbox``: run the sandbox Capillary server from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from worker.config import DEFAULT_SANDBOX_PORT


def sandbox_command() -> click.Command:
    """Build the ``sandbox`` command (the CLI asks for it only when it is run)."""

    @click.command("sandbox")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=int, default=DEFAULT_SANDBOX_PORT, show_default=True,
                  help="0 picks a free port (printed on start).")
    @click.option("--scenario", type=click.Path(exists=True, dir_okay=False),
                  help="Scenario JSON: series behaviours, unknown customers, config.")
    @click.option("--latency", "latency_s", type=float, default=0.0, show_default=True,
                  help="Seconds added to every Capillary call.")
    @click.option("--rate-limit-per-minute", type=int, default=None,
                  help="Answer 429 beyond this many calls per minute per API key.")
    @click.option("--token-ttl", "token_ttl_s", type=int, default=300, show_default=True)
    @click.option("--timezone", default="+00:00", show_default=True,
                  help="The server's zone for validTill, e.g. +05:30.")
    @click.option("--strict-series", is_flag=True, help="Unconfigured series answer 707.")
    @click.option("--shuffle-entries", is_flag=True,
                  help="Answer bulk-issue entries in an order of their own.")
    @click.option("--readback-lag", "readback_lag_s", type=float, default=0.0,
                  show_default=True,
                  help="Seconds a coupon stays invisible to the read-backs after issue.")
    @click.option("--seed", type=int, default=None,
                  help="Seed coupon codes and probabilistic faults (repeatable runs).")
    @click.option("--tls-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Serve HTTPS with a certificate from a CA made for this run; the CA's "
                       "certificate is written here (sandbox-ca.pem: the worker's "
                       "REQUESTS_CA_BUNDLE).")
    def sandbox(host: str, port: int, scenario: str | None, latency_s: float,
                rate_limit_per_minute: int | None, token_ttl_s: int, timezone: str,
                strict_series: bool, shuffle_entries: bool, readback_lag_s: float,
                seed: int | None, tls_dir: Path | None) -> None:
        """Run the sandbox Capillary server (Basic: store.server/server123, OAuth: demo-key)."""
        from coupon_devtools.sandbox import SandboxOptions, load_scenario, run

        options = SandboxOptions(
            token_ttl_seconds=token_ttl_s,
            latency_seconds=latency_s,
            rate_limit_per_minute=rate_limit_per_minute,
            timezone=timezone,
            strict_series=strict_series,
            shuffle_entries=shuffle_entries,
            readback_lag_seconds=readback_lag_s,
            scenario=load_scenario(scenario) if scenario else None,
            seed=seed,
        )
        run(host, port, options, tls_dir)

    return sandbox
