"""coupon-worker: issue loyalty coupons through Capillary's bulk-issue API, exactly once.

Where things live, by role (each layer imports only those below it; import-linter checks):
- ``worker.entrypoints``: where work enters. An event comes in through the bus intake
  (``celery.intake``, or ``celery.bridge``: plain JSON on the bus) or the Celery task
  ``coupons.issue`` (``celery.tasks``); people come in through ``cli`` and ``console``;
- ``worker.bootstrap``: the composition root, which builds every dependency from the settings;
- ``worker.usecases``: what the worker does; ``usecases.issue`` decides what to call,
  ``usecases.attempt`` records the outcome, ``usecases.reconcile`` settles an unknown one and
  ``usecases.sweep`` is the periodic work;
- ``worker.adapters``: PostgreSQL (``postgres``, the ledger that holds every event, entity, call
  and coupon), Capillary (``capillary``) and RabbitMQ (``rabbitmq``);
- ``worker.domain``: the rules, no I/O; ``domain.events`` validates an event,
  ``domain.verdicts`` says what an answer proves, ``domain.policy`` is where retry, backoff,
  dead-letter and circuit-breaker decisions are made;
- beside them ``config`` (the settings), ``logs``, ``metrics`` and ``health``.
"""

__version__ = "0.1.0"
