"""RabbitMQ: the queues every component declares (``topology``), the task names (``names``),
Celery's configuration (``celery_config``), the publishers (``publisher``), how the worker's
steps find each other (``links``), the queues' backlog (``backlog``), the delivery limit and
parking queue (``parking``) and a user per component (``permissions``). The Celery app, its tasks
and bootsteps are entrypoints (``worker.entrypoints.celery``). It may import the domain and the
settings, never a use case or an entrypoint.
"""
