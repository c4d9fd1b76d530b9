"""The Celery app (``app``, the composition root's attachment point), its thin tasks (``tasks``)
and what runs in a worker beside them (installed by ``worker_steps``): the bus bridge and intake,
the sweeper, the consumption guard, liveness, the metrics step, our consumer, and the
shutdown hooks that let go of each process's database pool and HTTP sessions. ``celery -A
worker.entrypoints.celery.app worker`` runs it. It may import the composition root, the use
cases, the adapters and the domain, never the command line nor the console.
"""
