"""A RabbitMQ user per component, each with only the permissions its job needs.

RabbitMQ grants three regular expressions per user and vhost, matched against exchange and
queue names: *configure* (declare, delete), *write* (publish to an exchange; bind a queue) and
*read* (consume from a queue; bind from an exchange). Every name here comes from the
topology (``worker.adapters.rabbitmq.topology``) and from Celery's own resources:

- ``celeryev``: the topic exchange of task events; Flower reads them through a queue of its
  own, ``celeryev.<uuid>``;
- ``celery.pidbox`` (fanout) and ``<node>.celery.pidbox``: remote control of the workers
  (Flower's inspect, shutdown, pool changes); answers come back on ``reply.celery.pidbox``
  through ``<uuid>.reply.celery.pidbox`` queues.

Each of the project's queues is bound to an exchange of the same name, and declaring a queue
binds it (*write* on the queue, *read* on the exchange): a component that declares what it
publishes to, as the producer and the console do, therefore also holds *read* on that name.
What no regular expression can express is said in docs/security.md.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from worker.config import Settings

Component = Literal["worker", "producer", "flower", "console"]
COMPONENTS: tuple[Component, ...] = ("worker", "producer", "flower", "console")
DEFAULT_PREFIX = "coupons"
NOTHING = "^$"

# Publishing through it reaches any queue by name: only the worker may.
_DEFAULT_EXCHANGE = r"amq\.default"
_EVENTS = "celeryev"
_EVENT_QUEUES = r"celeryev\..+"
_CONTROL = r"celery\.pidbox"
_NODE_CONTROL = r".+@.+\.celery\.pidbox"
_REPLY = r"reply\.celery\.pidbox"
_REPLY_QUEUES = r"[0-9a-f-]+\.reply\.celery\.pidbox"


@dataclass(frozen=True)
class Permissions:
    """The three regular expressions of ``rabbitmqctl set_permissions``."""

    configure: str
    write: str
    read: str

    def allows(self, kind: Literal["configure", "write", "read"], name: str) -> bool:
        return re.search(getattr(self, kind), name) is not None


def _any(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$" if patterns else NOTHING


def permissions(settings: Settings) -> dict[Component, Permissions]:
    """What each component may do on the vhost, for the queue names of ``settings``."""
    events, tasks, retry, dead = (re.escape(name) for name in (
        settings.events_queue, settings.tasks_queue, settings.retry_queue,
        settings.dead_queue))
    worker_names = (events, tasks, retry, dead, _EVENTS, _CONTROL, _NODE_CONTROL, _REPLY)
    return {
        # Declares the topology, consumes events, tasks and retries, publishes retries, dead
        # letters and (bridge intake) tasks, sends task events, answers remote control. The
        # bridge sends its tasks the way Celery does by default, through the default exchange.
        "worker": Permissions(configure=_any(*worker_names),
                              write=_any(*worker_names, _DEFAULT_EXCHANGE),
                              read=_any(*worker_names)),
        # Puts plain-JSON events on the bus: the events exchange and its queue, nothing else.
        "producer": Permissions(configure=_any(events), write=_any(events), read=_any(events)),
        # Reads task events through its own queue and asks workers for their state; may not
        # publish to (nor read) any of the project's exchanges and queues.
        "flower": Permissions(
            configure=_any(_EVENTS, _EVENT_QUEUES, _CONTROL, _REPLY, _REPLY_QUEUES),
            write=_any(_EVENT_QUEUES, _CONTROL, _REPLY_QUEUES),
            read=_any(_EVENTS, _EVENT_QUEUES, _REPLY, _REPLY_QUEUES)),
        # Resubmits fixed events (as tasks) and replays entities (as retries).
        "console": Permissions(configure=_any(tasks, retry), write=_any(tasks, retry),
                               read=_any(tasks, retry)),
    }


def user_name(component: Component, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{component}"


def password_variable(component: Component) -> str:
    """The environment variable the printed commands read the user's password from."""
    return f"RABBITMQ_{component.upper()}_PASSWORD"


def rabbitmqctl_commands(settings: Settings, *, vhost: str = "/",
                         prefix: str = DEFAULT_PREFIX,
                         rabbitmqctl: str = "rabbitmqctl") -> list[str]:
    """Shell lines that create (or update) the users and set their permissions; passwords are
    read from ``$RABBITMQ_<COMPONENT>_PASSWORD`` and required. Idempotent."""
    lines: list[str] = []
    for component, granted in permissions(settings).items():
        user = shlex.quote(user_name(component, prefix))
        password = f'"${{{password_variable(component)}:?set {password_variable(component)}}}"'
        lines.append(f"{rabbitmqctl} add_user {user} {password} 2>/dev/null "
                     f"|| {rabbitmqctl} change_password {user} {password}")
        # No management tags: none of them logs in to the management UI.
        lines.append(f"{rabbitmqctl} set_user_tags {user}")
        lines.append(f"{rabbitmqctl} set_permissions -p {shlex.quote(vhost)} {user} "
                     f"{shlex.quote(granted.configure)} {shlex.quote(granted.write)} "
                     f"{shlex.quote(granted.read)}")
    return lines
