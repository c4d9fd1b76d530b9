"""coupon-worker: issue loyalty coupons through Capillary's bulk-issue API, exactly once.

Where things live:
- an event enters through ``worker.broker.bridge`` (plain JSON on the bus) or the Celery task
  ``coupons.issue`` (``worker.tasks``), is validated by ``worker.events``;
- ``worker.services`` decides what to call and records the outcome;
- ``worker.policy`` is where retry, backoff, dead-letter and circuit-breaker decisions are made;
- ``worker.ledger`` is the PostgreSQL ledger that holds every event, entity, call and coupon.
"""

__version__ = "0.1.0"
