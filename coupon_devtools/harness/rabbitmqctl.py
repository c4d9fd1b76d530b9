"""Run ``rabbitmqctl`` for tools that set up a vhost of their own (the demo, the bench)."""

from __future__ import annotations

import shutil
import subprocess

from worker.errors import BrokerUnavailable

RABBITMQCTL_TIMEOUT_S = 60.0


def rabbitmqctl(*args: str, allowed_error: str | None = None,
                timeout_s: float = RABBITMQCTL_TIMEOUT_S) -> str:
    """Run one ``rabbitmqctl`` command and return what it printed; an output containing
    ``allowed_error`` is success."""
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise BrokerUnavailable("rabbitmqctl not found")
    try:
        done = subprocess.run([command, "-q", *args], capture_output=True, text=True,  # noqa: S603
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerUnavailable(f"rabbitmqctl {args[0]} timed out") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        if allowed_error and allowed_error in output:
            return output
        raise BrokerUnavailable(
            f"rabbitmqctl {args[0]} failed: {(output.splitlines() or ['?'])[-1]}")
    return done.stdout
