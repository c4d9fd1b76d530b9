"""RabbitMQ: the queue topology, the Celery app, publishers and the plain-JSON bridge."""
