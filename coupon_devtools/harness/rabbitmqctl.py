"""RabbitMQ administration through ``rabbitmqctl``: one command, and vhosts of our own."""

from __future__ import annotations

import shutil
import subprocess

from worker.domain.errors import BrokerUnavailable

RABBITMQCTL_TIMEOUT_S = 60.0
AWAIT_STARTUP_TIMEOUT_S = 120.0
# rabbitmqctl's exit code while the node is not running (yet), e.g. just after a restart.
NODE_DOWN_EXIT_CODE = 64
NODE_DOWN_ATTEMPTS = 5


def rabbitmqctl(*args: str, allowed_error: str | None = None,
                timeout_s: float = RABBITMQCTL_TIMEOUT_S,
                wait_while_node_down: bool = False, node: str | None = None) -> str:
    """Run one ``rabbitmqctl`` command and return what it printed; an output containing
    ``allowed_error`` is success. Raises :class:`BrokerUnavailable` otherwise.

    ``node`` names the node to address (``-n``); by default rabbitmqctl's own (the machine's
    node, or ``RABBITMQ_NODENAME``'s).

    With ``wait_while_node_down``, a refusal because the node is (re)starting is followed by
    ``await_startup`` and another try: tests that restart the broker wait for it, but one
    command may still land in that gap. The chaos run leaves it off, since it stops the node's
    app on purpose and must not wait for it to come back.
    """
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise BrokerUnavailable("rabbitmqctl not found")
    base = [command, "-q", *(["-n", node] if node else [])]
    attempts = NODE_DOWN_ATTEMPTS if wait_while_node_down else 1
    for _attempt in range(attempts):
        done = _run([*base, *args], timeout_s)
        if done.returncode != NODE_DOWN_EXIT_CODE:
            break
        if wait_while_node_down:
            _run([*base, "await_startup"], AWAIT_STARTUP_TIMEOUT_S)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        if allowed_error and allowed_error in output:
            return output
        raise BrokerUnavailable(
            f"rabbitmqctl {args[0]} failed: {(output.splitlines() or ['?'])[-1]}")
    return done.stdout


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True,  # noqa: S603 - argv is ours
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerUnavailable(f"rabbitmqctl {' '.join(argv[2:])} timed out") from exc


def create_vhost(vhost: str, user: str = "guest", *, fresh: bool = False,
                 wait_while_node_down: bool = False, node: str | None = None) -> None:
    """Create ``vhost`` and give ``user`` every permission on it; ``fresh`` deletes it first,
    so that no queue or message of an earlier run is left."""
    if fresh:
        delete_vhost(vhost, wait_while_node_down=wait_while_node_down, node=node)
    rabbitmqctl("add_vhost", vhost, wait_while_node_down=wait_while_node_down, node=node)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*",
                wait_while_node_down=wait_while_node_down, node=node)


def delete_vhost(vhost: str, *, wait_while_node_down: bool = False,
                 node: str | None = None) -> None:
    """Delete ``vhost`` with its queues; a vhost that does not exist is no error."""
    rabbitmqctl("delete_vhost", vhost, allowed_error="does not exist",
                wait_while_node_down=wait_while_node_down, node=node)
