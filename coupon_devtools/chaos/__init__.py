"""``coupon-worker chaos``: the pipeline under restarts and outages, checked for exactly once."""
