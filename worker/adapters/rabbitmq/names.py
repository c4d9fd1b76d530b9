"""The names the broker and the code agree on: Celery task names.

A leaf: it imports nothing from the project, so the app, the tasks, the publisher and the
bootsteps can all name a task without importing one another. Queue names are settings
(``COUPONS_*_QUEUE``), built into kombu queues by ``worker.adapters.rabbitmq.topology``.
"""

from __future__ import annotations

#: An event from a Python producer (Celery protocol).
TASK_ISSUE = "coupons.issue"
#: A raw plain-JSON bus message, forwarded by the bridge.
TASK_INGEST = "coupons.ingest"
#: One entity whose retry is due, dispatched by the sweeper.
TASK_RETRY = "coupons.retry"

TASK_NAMES = (TASK_ISSUE, TASK_INGEST, TASK_RETRY)

#: Between a worker's id and its task's id in the ledger's ``worker`` columns
#: (``host:pid/task:<celery task id>``), which the console turns into a link to Flower.
TASK_MARK = "/task:"


def split_worker(value: str) -> tuple[str, str | None]:
    """A ledger ``worker`` column as (the process ``host:pid``, the Celery task id or None)."""
    process, _, task_id = value.partition(TASK_MARK)
    return process, task_id or None
