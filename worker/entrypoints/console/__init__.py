"""The support console: a server-rendered web app over the same ledger and support use cases as
the command line (``coupon-worker console``). Its pages read through ``worker.usecases.queries``
and act through ``worker.usecases.support`` and ``replay_jobs``; no SQL here. It may import the
composition root, the use cases, the adapters and the domain, never the command line nor the
Celery app.
"""
