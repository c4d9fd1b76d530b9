"""``coupon-worker bench``: throughput at the API's limit, against a bare Celery baseline."""
