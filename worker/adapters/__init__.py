"""The adapters: each translates one outside system for the use cases, and its errors into the
domain's. ``postgres`` is the ledger (every SQL statement lives there, with the rate limit and
the circuit breaker it keeps), ``capillary`` the coupon API's HTTP client and the reading of its
answers, ``rabbitmq`` the queue topology, Celery's configuration and the publishers. They may
import the domain, the settings, the logs and the metrics, and one another's records; never a
use case, the composition root or an entrypoint.
"""
